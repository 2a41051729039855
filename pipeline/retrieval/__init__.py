"""Retrieval: MAP, MAP@k and PR curves by Hamming ranking, the packed-code index, the evaluation
protocol (which splits are queries and which the database), top-k search with a model's codes, and
the metrics' benchmark. Imports neither Ray nor MLflow."""
