//! Hex (de)serialisation of byte strings (lowercase on the way out),
//! bounded on the way in: `#[serde(with = "kernex_protocol::api::hex::bytes")]`.

/// Required byte strings of at most 2,048 bytes (a `TPMS_ATTEST`, a
/// `TPMT_PUBLIC`, a credential blob).
pub mod bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Longest accepted hex string.
    pub const MAX_HEX: usize = 4096;

    /// Serialises as lowercase hex.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    /// Parses hex, refusing more than [`MAX_HEX`] characters before decoding.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() > MAX_HEX {
            return Err(serde::de::Error::custom(format!(
                "hex string of {} characters, more than the limit of {MAX_HEX}",
                text.len()
            )));
        }
        hex::decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// Optional byte strings of at most 4 KiB (an EK certificate).
pub mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Longest accepted hex string: a 4 KiB certificate.
    pub const MAX_HEX: usize = 8192;

    /// Serialises as lowercase hex, or none.
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    /// Parses hex, refusing more than [`MAX_HEX`] characters before decoding.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = <Option<String>>::deserialize(d)?;
        text.map(|t| {
            if t.len() > MAX_HEX {
                return Err(serde::de::Error::custom(format!(
                    "hex string of {} characters, more than the limit of {MAX_HEX}",
                    t.len()
                )));
            }
            hex::decode(t).map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}
