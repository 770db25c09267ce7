"""The llama.cpp side (the app's): the VLM, the converter, the grammar, arm64, crash supervision."""
