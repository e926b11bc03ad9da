"""The generation stage: the engine (static KV cache slots, continuous batching, CUDA graphs), the model steps it
runs (engine_model), exact sampling, batch generation for prediction and evaluation (batch), and the worker thread
that the server and the demo submit requests to (worker).

May import: base, data, models."""
