"""The LLM pipeline: GGUF models through llama.cpp behind a request queue (issue #6).

``config`` (imported by ``pipelines.config``) needs no llama.cpp; ``pipeline`` does, through
``engines.llama`` when a pipeline is built.
"""
