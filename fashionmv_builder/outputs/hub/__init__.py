"""Publishing a build to the Hugging Face Hub: the published tables, their layout, the dataset card, the upload."""
