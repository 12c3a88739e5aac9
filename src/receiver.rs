//! The reference receiver (`outboxd receive`). Being written.
