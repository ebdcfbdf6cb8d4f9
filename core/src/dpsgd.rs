//! DP-SGD (being written).
