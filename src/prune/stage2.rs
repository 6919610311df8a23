//! Nüwa Stage 2 (inside the LLM): keep the image tokens the last prompt token attends to most.

use std::ops::Range;

use super::{require_keep, top_k_sorted};
use crate::error::{Error, Result};

/// Stage 2: the top-`keep` image positions of `attention_row` (the split layer's last-query row, head mean).
///
/// `attention_row` covers every position of the sequence; `image_span` is where the (Stage-1 kept) image tokens
/// sit. Returns indices relative to `image_span.start`, sorted ascending, ties to the lower index; `keep >=` the
/// span length keeps the whole span.
pub fn nuwa_stage2(attention_row: &[f32], image_span: Range<usize>, keep: usize) -> Result<Vec<usize>> {
    require_keep("stage 2", keep)?;
    if image_span.start > image_span.end || image_span.end > attention_row.len() {
        return Err(Error::Shape {
            what: "stage-2 attention row".into(),
            message: format!("image span {image_span:?} does not fit a row of {} positions", attention_row.len()),
        });
    }
    Ok(top_k_sorted(&attention_row[image_span], keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn picks_top_k_in_span() {
        let row = [9.0, 0.1, 0.5, 0.5, 0.2, 0.7, 9.0];
        assert_eq!(nuwa_stage2(&row, 1..6, 2).unwrap(), vec![1, 4]);
        assert_eq!(nuwa_stage2(&row, 1..6, 3).unwrap(), vec![1, 2, 4]);
        assert_eq!(nuwa_stage2(&row, 1..6, 10).unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(nuwa_stage2(&row, 1..6, 0).is_err());
        assert!(nuwa_stage2(&row, 3..9, 1).is_err());
    }

    proptest! {
        #[test]
        fn picks_are_the_true_top_k(vals in proptest::collection::vec(0u8..8, 1..60), a in 0usize..60,
                                    len in 0usize..60, keep in 1usize..70) {
            let row: Vec<f32> = vals.iter().map(|&v| f32::from(v) / 8.0).collect();
            let start = a.min(row.len());
            let end = (start + len).min(row.len());
            let kept = nuwa_stage2(&row, start..end, keep).unwrap();
            prop_assert_eq!(kept.len(), keep.min(end - start));
            prop_assert!(kept.windows(2).all(|p| p[0] < p[1]));
            let span = &row[start..end];
            // Every kept score beats (or ties with a higher index) every dropped one.
            for (i, &s) in span.iter().enumerate() {
                if kept.contains(&i) { continue; }
                for &k in &kept {
                    prop_assert!(span[k] > s || (span[k] == s && k < i));
                }
            }
        }
    }
}
