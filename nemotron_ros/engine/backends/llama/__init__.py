"""llama.cpp runtime (GGUF) through llama-cpp-python's low-level ctypes API."""
