//! Tests of the bundle capability: a real bundle from planted files.
