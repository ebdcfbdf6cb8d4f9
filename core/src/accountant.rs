//! Privacy accounting (being written).
