"""The method's math and models: RSHNL's and SCBCH's losses, hash models, named variants, model
files and batched encoding. Imports neither Ray nor MLflow."""
