"""The app's reference client: a fortune from three photos, against a llama.cpp server."""
