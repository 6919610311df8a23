"""Export helpers for nuwa: Hugging Face LLaVA checkpoints -> the ONNX model directory of docs/model-format.md.

Modules:
  vision    -- vision-tower wrapper (features, CLS attention, similarity features) for CLIP and DINOv2 towers
  decoder   -- Llama decoder head/tail wrappers with explicit sequence-major KV and the Stage-2 attention row
  export    -- torch -> ONNX export of each graph, embedding table, quantisation
  manifest  -- image/tokenizer/prompt sections of manifest.json, derived from the checkpoint's processor
  verify    -- onnxruntime-vs-PyTorch checks, run the way the Rust runtime runs the graphs
"""
