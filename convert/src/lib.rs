//! Conversion of Hugging Face Mipha checkpoints to .mqf.
