//! U-Boot environment codec (issue #3).
