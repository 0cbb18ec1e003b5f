//! kernex-image library.
