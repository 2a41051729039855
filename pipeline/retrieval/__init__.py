"""Retrieval: MAP, MAP@k and PR curves by Hamming ranking, the packed-code index, and the
evaluation protocol (which splits are queries and which the database). Imports neither Ray nor
MLflow."""
