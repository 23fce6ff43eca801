"""The llm example's serving side: the token loop over a decoder split into pipeline stages (pipeline.py)."""
