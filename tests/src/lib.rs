//! End-to-end suites live under `tests/`.
