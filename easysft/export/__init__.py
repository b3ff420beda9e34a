"""Exports of a trained model: a merged or re-saved HF checkpoint (:mod:`easysft.export.checkpoint`), or a GGUF
file with an Ollama Modelfile for llama.cpp-family runtimes (:mod:`easysft.export.gguf`)."""
