//! Whether a JPEG file is whole, before it is decoded: decoders draw missing or unreadable blocks grey (a missing
//! progressive scan as a blurred preview) and report success, which would be a silent wrong answer. The file's
//! scans are decoded far enough to count their blocks (ITU T.81), without reconstructing a pixel.

/// Whether a JPEG stream is whole: walks the marker segments from the start (skipping each segment by its length,
/// so an EXIF thumbnail inside APP1 is never mistaken for the main image) and each scan's entropy-coded data to the
/// next marker, and stops at the first end-of-image. Whatever follows it (the video of a motion photo, vendor
/// trailers) is not looked at. The scans of a Huffman-coded image, sequential (baseline or extended) or
/// progressive, are decoded far enough to count their blocks: a scan that ends before its last MCU was cut short,
/// even where an end-of-image marker follows (a download cut off and "repaired"). At the end, every component must
/// have been coded, and in a progressive image every coefficient down to its last bit (what every encoder's scan
/// script does; a file cut between two scans would decode as a blurred preview). Arithmetic-coded, lossless and
/// hierarchical scans are only walked. Returns why the stream is not whole.
pub(super) fn check_whole(bytes: &[u8]) -> std::result::Result<(), String> {
    const NO_END: &str = "no end-of-image marker after the last scan";
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("no start-of-image marker".into());
    }
    let mut frame: Option<scan::Frame> = None;
    let mut tables = scan::Tables::default();
    let mut progress = scan::Progress::default();
    let mut scans = 0usize;
    let mut at = 2;
    loop {
        // Stray bytes between segments are skipped to the next marker, as libjpeg (with a warning) and the decoder
        // do; fill bytes (0xFF runs) may precede a marker.
        let Some(rel) = bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else { return Err(NO_END.into()) };
        at += rel;
        while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) else { return Err(NO_END.into()) };
        at += 2;
        match marker {
            0xD9 => {
                // A file cut between two scans (its end marker appended) would draw a component that no scan coded
                // grey, and a progressive one's unrefined coefficients as a blurred preview.
                if let Some(why) = frame.as_ref().filter(|f| f.countable()).and_then(|f| progress.incomplete(f)) {
                    return Err(why);
                }
                return Ok(());
            }
            // Markers without a length: TEM, RSTn (outside a scan they carry nothing).
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else { return Err(NO_END.into()) };
        if len < 2 {
            return Err(format!("a segment (marker 0xFF{marker:02X}) has length {len}"));
        }
        let Some(body) = bytes.get(at + 2..at + len) else { return Err(NO_END.into()) };
        at += len;
        match marker {
            0xC0..=0xCF if marker != 0xC4 && marker != 0xC8 && marker != 0xCC => {
                // One frame per image (a thumbnail's sits inside its APP segment, skipped above): a second one could
                // claim other dimensions than those the size limits were checked against.
                if frame.is_some() {
                    return Err(format!("a second frame header (marker 0xFF{marker:02X})"));
                }
                frame = Some(scan::Frame::parse(marker, body)?);
            }
            0xC4 => tables.define_huffman(body)?,
            0xDD => tables.define_restart_interval(body)?,
            _ => {}
        }
        if marker == 0xDA {
            scans += 1;
            if let Some(f) = frame.as_ref().filter(|f| f.countable()) {
                at = scan::check_scan(f, &tables, &mut progress, body, bytes, at).map_err(|e| format!("scan {scans}: {e}"))?;
            }
            // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte) or RSTn inside it; any other marker ends it.
            loop {
                let Some(rel) = bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else { return Err(NO_END.into()) };
                at += rel;
                match bytes.get(at + 1) {
                    None => return Err(NO_END.into()),
                    Some(0x00 | 0xD0..=0xD7) => at += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Counting the MCUs of a Huffman-coded scan without reconstructing pixels (ITU T.81, F.2.2 sequential, G.1.2
/// progressive).
mod scan {
    /// What the frame header says about the block layout.
    pub(super) struct Frame {
        /// Baseline or extended sequential, Huffman-coded (SOF0, SOF1): the scans can be counted.
        pub sequential_huffman: bool,
        /// Progressive, Huffman-coded (SOF2): the scans can be counted too.
        pub progressive: bool,
        pub width: usize,
        pub height: usize,
        /// (component id, horizontal sampling, vertical sampling)
        pub components: Vec<(u8, usize, usize)>,
    }

    impl Frame {
        /// Whether its scans' blocks can be counted: Huffman-coded, with the height in the frame header (not in a
        /// later DNL segment).
        pub fn countable(&self) -> bool {
            (self.sequential_huffman || self.progressive) && self.height > 0
        }

        pub fn parse(marker: u8, body: &[u8]) -> Result<Frame, String> {
            let bad = || format!("the frame header (marker 0xFF{marker:02X}) is malformed");
            let (&[_precision, h1, h0, w1, w0, n], rest) = body.split_first_chunk::<6>().ok_or_else(bad)?;
            let n = usize::from(n);
            if n == 0 || rest.len() < 3 * n {
                return Err(bad());
            }
            let components = rest[..3 * n]
                .chunks_exact(3)
                .map(|c| (c[0], usize::from(c[1] >> 4), usize::from(c[1] & 15)))
                .collect::<Vec<_>>();
            if components.iter().any(|&(_, h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v)) {
                return Err(format!("the frame header (marker 0xFF{marker:02X}) has a sampling factor outside 1-4"));
            }
            Ok(Frame {
                sequential_huffman: matches!(marker, 0xC0 | 0xC1),
                progressive: marker == 0xC2,
                width: usize::from(u16::from_be_bytes([w1, w0])),
                height: usize::from(u16::from_be_bytes([h1, h0])),
                components,
            })
        }
    }

    /// Bits looked up at once; longer codes are decoded length by length (F.2.2.3).
    const FAST_BITS: u32 = 9;

    /// A canonical Huffman table.
    struct Huffman {
        /// Per code length 1..=16: the first code, its count, and the index of its first symbol.
        first: [i32; 17],
        count: [i32; 17],
        offset: [usize; 17],
        symbols: Vec<u8>,
        /// For each FAST_BITS-bit prefix: (code length, symbol) of the code it starts with, length 0 if longer.
        fast: Vec<(u8, u8)>,
    }

    #[derive(Default)]
    pub(super) struct Tables {
        dc: [Option<Huffman>; 4],
        ac: [Option<Huffman>; 4],
        restart_interval: usize,
    }

    impl Tables {
        pub fn define_huffman(&mut self, mut body: &[u8]) -> Result<(), String> {
            while !body.is_empty() {
                let bad = || "a Huffman table segment is malformed".to_string();
                let (&class_id, rest) = body.split_first().ok_or_else(bad)?;
                let counts = rest.get(..16).ok_or_else(bad)?;
                let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
                let symbols = rest.get(16..16 + total).ok_or_else(bad)?.to_vec();
                let (mut first, mut count, mut offset) = ([0i32; 17], [0i32; 17], [0usize; 17]);
                let (mut code, mut index) = (0i32, 0usize);
                for len in 1..=16 {
                    let c = i32::from(counts[len - 1]);
                    (first[len], count[len], offset[len]) = (code, c, index);
                    code = (code + c) << 1;
                    index += usize::from(counts[len - 1]);
                }
                let mut fast = vec![(0u8, 0u8); 1 << FAST_BITS];
                for len in 1..=FAST_BITS as usize {
                    for k in 0..count[len] {
                        let Some(&symbol) = symbols.get(offset[len] + k as usize) else { break };
                        // Every FAST_BITS-bit prefix that starts with this code.
                        let shift = FAST_BITS as usize - len;
                        let base = ((first[len] + k) as usize) << shift;
                        for e in fast.iter_mut().skip(base).take(1 << shift) {
                            *e = (len as u8, symbol);
                        }
                    }
                }
                let table = Huffman { first, count, offset, symbols, fast };
                let slot = usize::from(class_id & 15);
                match (class_id >> 4, slot) {
                    (0, 0..=3) => self.dc[slot] = Some(table),
                    (1, 0..=3) => self.ac[slot] = Some(table),
                    _ => return Err(format!("a Huffman table has class/id 0x{class_id:02X}")),
                }
                body = &rest[16 + total..];
            }
            Ok(())
        }

        pub fn define_restart_interval(&mut self, body: &[u8]) -> Result<(), String> {
            let b = body.get(..2).ok_or("the restart interval segment is malformed")?;
            self.restart_interval = usize::from(u16::from_be_bytes([b[0], b[1]]));
            Ok(())
        }
    }

    /// Entropy-coded bits, with stuffed zero bytes removed; stops at any marker.
    struct Bits<'a> {
        data: &'a [u8],
        /// The next byte not yet in `acc`.
        pos: usize,
        /// The low `n` bits are the next bits of the scan.
        acc: u64,
        n: u32,
        /// `pos` is at a marker: no more bits until a restart.
        marker: bool,
    }

    impl Bits<'_> {
        fn refill(&mut self) {
            while self.n <= 56 && !self.marker {
                let Some(&b) = self.data.get(self.pos) else {
                    self.marker = true;
                    break;
                };
                if b == 0xFF {
                    if self.data.get(self.pos + 1) != Some(&0x00) {
                        self.marker = true; // the scan's data ends here (or at a restart)
                        break;
                    }
                    self.pos += 1;
                }
                self.pos += 1;
                self.acc = (self.acc << 8) | u64::from(b);
                self.n += 8;
            }
        }

        /// The next `k` bits (zeros past the end of the data).
        fn peek(&self, k: u32) -> usize {
            let v = if self.n >= k { self.acc >> (self.n - k) } else { self.acc << (k - self.n) };
            (v & ((1u64 << k) - 1)) as usize
        }

        fn consume(&mut self, k: u32) -> Result<(), Stop> {
            if k > self.n {
                return Err(Stop::End);
            }
            self.n -= k;
            Ok(())
        }

        /// The next `k` bits as a number (k <= 16).
        fn take(&mut self, k: u32) -> Result<u32, Stop> {
            if self.n < k {
                self.refill();
            }
            let v = self.peek(k) as u32;
            self.consume(k)?;
            Ok(v)
        }

        /// The next symbol of table `t`, with the `extra(symbol)` value bits after its code skipped.
        fn symbol(&mut self, t: &Huffman, extra: impl Fn(u8) -> u8) -> Result<u8, Stop> {
            // A code and its value bits are at most 32 bits.
            if self.n < 32 {
                self.refill();
            }
            let (len, symbol) = t.fast[self.peek(FAST_BITS)];
            if len > 0 {
                self.consume(u32::from(len) + u32::from(extra(symbol)))?;
                return Ok(symbol);
            }
            for len in FAST_BITS as usize + 1..=16 {
                let k = self.peek(len as u32) as i32 - t.first[len];
                if k < t.count[len] {
                    let symbol = t.symbols.get(t.offset[len] + k as usize).copied().ok_or(Stop::Corrupt("a Huffman table is short"))?;
                    self.consume(len as u32 + u32::from(extra(symbol)))?;
                    return Ok(symbol);
                }
            }
            // Past the end of the data, the zeros may form no code: the data ended, it is not corrupt.
            if self.n < 16 {
                return Err(Stop::End);
            }
            Err(Stop::Corrupt("a code matches no Huffman table entry"))
        }

        /// Past a restart marker (byte-aligned, fill bytes allowed), or None where there is none.
        fn restart(&mut self) -> Option<()> {
            (self.acc, self.n, self.marker) = (0, 0, false);
            let mut p = self.pos;
            while self.data.get(p) == Some(&0xFF) && self.data.get(p + 1) == Some(&0xFF) {
                p += 1;
            }
            match (self.data.get(p), self.data.get(p + 1)) {
                (Some(0xFF), Some(0xD0..=0xD7)) => {
                    self.pos = p + 2;
                    Some(())
                }
                _ => None,
            }
        }
    }

    enum Stop {
        End,
        Corrupt(&'static str),
    }

    /// One block of a sequential scan: its DC difference and AC coefficients (F.2.2).
    fn block(bits: &mut Bits, dc: &Huffman, ac: &Huffman) -> Result<(), Stop> {
        dc_first(bits, dc)?;
        let mut k = 1;
        while k < 64 {
            // An AC symbol is a zero run (high nibble) and the size of the coefficient that follows (low nibble).
            let rs = bits.symbol(ac, |s| s & 15)?;
            let (run, size) = (rs >> 4, rs & 15);
            if size == 0 {
                if run != 15 {
                    return Ok(()); // end of block
                }
                k += 16;
                continue;
            }
            k += usize::from(run) + 1;
        }
        if k > 64 {
            return Err(Stop::Corrupt("a block has more than 64 coefficients"));
        }
        Ok(())
    }

    /// A DC difference: a symbol giving its size, then that many bits (at most 16: more is corrupt).
    fn dc_first(bits: &mut Bits, dc: &Huffman) -> Result<(), Stop> {
        if bits.symbol(dc, |s| s.min(16))? > 16 {
            return Err(Stop::Corrupt("a DC difference is over 16 bits"));
        }
        Ok(())
    }

    /// The first pass over a band of AC coefficients of one block (G.1.2.2): `eobrun` blocks left in a run of
    /// empty ones, `nonzero` the block's coefficients known to be nonzero.
    fn ac_first(bits: &mut Bits, ac: &Huffman, (ss, se): (usize, usize), eobrun: &mut u32, nonzero: &mut u64) -> Result<(), Stop> {
        if *eobrun > 0 {
            *eobrun -= 1;
            return Ok(());
        }
        let mut k = ss;
        while k <= se {
            let rs = bits.symbol(ac, |s| s & 15)?;
            let (run, size) = (rs >> 4, rs & 15);
            if size == 0 {
                if run < 15 {
                    // This block and (2^run - 1 + the next run bits) more end here.
                    *eobrun = (1 << run) - 1 + if run > 0 { bits.take(u32::from(run))? } else { 0 };
                    return Ok(());
                }
                k += 16;
                continue;
            }
            k += usize::from(run);
            if k < 64 {
                *nonzero |= 1 << k;
            }
            k += 1;
        }
        Ok(())
    }

    /// A refinement pass over a band of AC coefficients of one block (G.1.2.3): a correction bit for every
    /// coefficient already nonzero, and new coefficients of magnitude one placed among the zero ones. Follows
    /// libjpeg's decoder (jdphuff.c) step for step, so a stream it reads is read the same way.
    fn ac_refine(bits: &mut Bits, ac: &Huffman, (ss, se): (usize, usize), eobrun: &mut u32, nonzero: &mut u64) -> Result<(), Stop> {
        let mut k = ss;
        if *eobrun == 0 {
            while k <= se {
                let rs = bits.symbol(ac, |_| 0)?;
                let (mut run, size) = (i32::from(rs >> 4), rs & 15);
                if size != 0 {
                    bits.take(1)?; // the new coefficient's sign
                } else if run != 15 {
                    *eobrun = (1 << run) + if run > 0 { bits.take(run as u32)? } else { 0 };
                    break;
                }
                // Past the nonzero coefficients (a correction bit each) and `run` zero ones.
                while k <= se {
                    if *nonzero & (1 << k) != 0 {
                        bits.take(1)?;
                    } else {
                        run -= 1;
                        if run < 0 {
                            break;
                        }
                    }
                    k += 1;
                }
                if size != 0 && k < 64 {
                    *nonzero |= 1 << k;
                }
                k += 1;
            }
        }
        if *eobrun > 0 {
            // In a run of blocks with no new coefficient: the correction bits of the rest of the band.
            while k <= se {
                if *nonzero & (1 << k) != 0 {
                    bits.take(1)?;
                }
                k += 1;
            }
            *eobrun -= 1;
        }
        Ok(())
    }

    /// What one scan codes (G.1.1.1): every coefficient (sequential), or in a progressive image the DC or a band of
    /// AC coefficients (`ss..=se`), first (Ah = 0) or one more bit of each (Ah > 0).
    #[derive(Clone, Copy)]
    enum Pass {
        Sequential,
        DcFirst,
        DcRefine,
        AcFirst(usize, usize),
        AcRefine(usize, usize),
    }

    /// What the scans so far have coded, kept from scan to scan.
    #[derive(Default)]
    pub(super) struct Progress {
        /// Per component of a progressive image, per block: the AC coefficients known to be nonzero, which a
        /// refinement scan sends a correction bit for.
        nonzero: Vec<Vec<u64>>,
        /// Per component, per coefficient (zigzag order): the lowest bit position (Al) its scans have coded so far
        /// (0 for all of them once a sequential scan has coded the component), `UNCODED` before any.
        al: Vec<[u8; 64]>,
    }

    const UNCODED: u8 = u8::MAX;

    impl Progress {
        /// Why the scans so far do not give every coefficient of every component in full (Al = 0), if they do not.
        pub fn incomplete(&self, f: &Frame) -> Option<String> {
            f.components.iter().enumerate().find_map(|(c, &(id, ..))| {
                let al = self.al.get(c).copied().unwrap_or([UNCODED; 64]);
                let k = al.iter().position(|&a| a != 0)?;
                Some(if al.iter().all(|&a| a == UNCODED) {
                    format!("the image ends before its component {id} is coded in a scan")
                } else if al[k] == UNCODED {
                    format!("the image ends before coefficient {k} of component {id} is coded")
                } else {
                    format!("the image ends before coefficient {k} of component {id} is refined to its last bit")
                })
            })
        }
    }

    /// Decodes the scan whose header is `header` and whose data starts at `bytes[at..]`, and returns where its last
    /// MCU ended, or why the scan is not whole.
    pub(super) fn check_scan(f: &Frame, tables: &Tables, progress: &mut Progress, header: &[u8], bytes: &[u8], at: usize) -> Result<usize, String> {
        let bad = || "its header is malformed".to_string();
        let n = usize::from(*header.first().ok_or_else(bad)?);
        let selectors = header.get(1..1 + 2 * n).ok_or_else(bad)?;
        let &[ss, se, a] = header.get(1 + 2 * n..4 + 2 * n).ok_or_else(bad)? else { return Err(bad()) };
        let (ss, se, ah, al) = (usize::from(ss), usize::from(se), a >> 4, a & 15);
        let pass = match (f.progressive, ss, ah) {
            (false, _, _) => Pass::Sequential,
            (true, 0, 0) => Pass::DcFirst,
            (true, 0, _) => Pass::DcRefine,
            _ if se < ss || se > 63 || n != 1 => return Err(format!("its spectral band {ss}..{se} over {n} components is invalid")),
            (true, _, 0) => Pass::AcFirst(ss, se),
            (true, _, _) => Pass::AcRefine(ss, se),
        };
        let (hmax, vmax) = f.components.iter().fold((1, 1), |(h, v), c| (h.max(c.1), v.max(c.2)));
        let div = |a: usize, b: usize| a.div_ceil(b);
        let (mcux, mcuy) = (div(f.width, 8 * hmax), div(f.height, 8 * vmax));
        // Per scan component: its index in the frame, the Huffman tables its pass reads, its sampling.
        let mut parts = Vec::with_capacity(n);
        for s in selectors.chunks_exact(2) {
            let c = f.components.iter().position(|c| c.0 == s[0]).ok_or_else(|| format!("it names component {} the frame lacks", s[0]))?;
            let dc = tables.dc.get(usize::from(s[1] >> 4)).and_then(Option::as_ref);
            let ac = tables.ac.get(usize::from(s[1] & 15)).and_then(Option::as_ref);
            let needs_dc = matches!(pass, Pass::Sequential | Pass::DcFirst);
            let needs_ac = matches!(pass, Pass::Sequential | Pass::AcFirst(..) | Pass::AcRefine(..));
            if (needs_dc && dc.is_none()) || (needs_ac && ac.is_none()) {
                return Err("it uses a Huffman table that is not defined".into());
            }
            parts.push((c, dc, ac));
        }
        // One component: its own blocks in raster order, one per MCU (A.2.2); several: MCUs of h x v blocks each.
        let (mcus, cols) = if let [(c, ..)] = parts[..] {
            let (_, h, v) = f.components[c];
            let cols = div(div(f.width * h, hmax), 8);
            (cols * div(div(f.height * v, vmax), 8), cols)
        } else {
            (mcux * mcuy, mcux)
        };
        if let (Pass::AcFirst(..) | Pass::AcRefine(..), [(c, ..)]) = (pass, &parts[..]) {
            if progress.nonzero.len() != f.components.len() {
                progress.nonzero = vec![Vec::new(); f.components.len()];
            }
            let (_, h, v) = f.components[*c];
            if progress.nonzero[*c].is_empty() {
                progress.nonzero[*c] = vec![0; mcux * h * mcuy * v];
            }
        }
        let mut bits = Bits { data: bytes, pos: at, acc: 0, n: 0, marker: false };
        let mut eobrun = 0u32;
        for m in 0..mcus {
            if m > 0 && tables.restart_interval > 0 && m % tables.restart_interval == 0 {
                if bits.restart().is_none() {
                    return Err(format!("a restart marker is missing before MCU {m} of {mcus}: the data is cut or corrupt"));
                }
                eobrun = 0;
            }
            for &(c, dc, ac) in &parts {
                let (_, h, v) = f.components[c];
                let blocks = if n == 1 { 1 } else { h * v };
                for _ in 0..blocks {
                    let step = match (pass, dc, ac) {
                        (Pass::Sequential, Some(dc), Some(ac)) => block(&mut bits, dc, ac),
                        (Pass::DcFirst, Some(dc), _) => dc_first(&mut bits, dc),
                        (Pass::DcRefine, ..) => bits.take(1).map(|_| ()),
                        (Pass::AcFirst(ss, se), _, Some(ac)) => {
                            let nonzero = &mut progress.nonzero[c][(m / cols) * mcux * h + m % cols];
                            ac_first(&mut bits, ac, (ss, se), &mut eobrun, nonzero)
                        }
                        (Pass::AcRefine(ss, se), _, Some(ac)) => {
                            let nonzero = &mut progress.nonzero[c][(m / cols) * mcux * h + m % cols];
                            ac_refine(&mut bits, ac, (ss, se), &mut eobrun, nonzero)
                        }
                        _ => unreachable!("tables checked above"),
                    };
                    match step {
                        Ok(()) => {}
                        Err(Stop::End) => return Err(format!("its data ends after {m} of {mcus} MCUs")),
                        Err(Stop::Corrupt(why)) => return Err(format!("its data is corrupt at MCU {m} of {mcus}: {why}")),
                    }
                }
            }
        }
        if progress.al.len() != f.components.len() {
            progress.al = vec![[UNCODED; 64]; f.components.len()];
        }
        let (band, al) = match pass {
            Pass::Sequential => (0..=63, 0),
            Pass::AcFirst(ss, se) | Pass::AcRefine(ss, se) => (ss..=se, al),
            Pass::DcFirst | Pass::DcRefine => (0..=0, al),
        };
        for &(c, ..) in &parts {
            progress.al[c][band.clone()].fill(al);
        }
        Ok(bits.pos)
    }
}
