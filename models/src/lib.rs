//! Mipha-3B model code.
