//! T5-XXL v1.1 encoder and tokenizer (being written).
