//! Hex (de)serialisation of optional byte strings, bounded on the way in.

pub(crate) mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Longest accepted hex string: a 4 KiB certificate.
    const MAX_HEX: usize = 8192;

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

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
