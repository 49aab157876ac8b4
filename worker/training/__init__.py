"""Fine-tuning, the library behind `slotmesh finetune` (flags in services/cli/finetune.py,
the benchmark in services/tools/bench_finetune.py).

Owns everything training needs around the serving model classes: the run's config and
its validation, the text → token-window data, the llama.cpp-style learning-rate halving
schedule, the optimizers (AdamW; SGD with no moment buffers), the epoch loop with its
progress bars and metrics, resumable checkpoints (safetensors + JSON) and the export to
a Hugging Face directory. The model is `worker.models.decoder.DecoderModel` itself,
trained through its `forward_dense`; the output directory goes back to the loaders
(`worker.loaders.hf`) so `slotmesh generate` and the worker serve it as they are.
"""
