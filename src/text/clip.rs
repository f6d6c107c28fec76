//! CLIP-L text model and tokenizer (being written).
