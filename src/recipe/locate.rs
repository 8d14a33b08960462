//! The line of a recipe field (`models[1].parameters.weight[0].value`), for messages.
//!
//! serde_yaml_ng keeps no positions in its values, but it reports the position of the node
//! where deserialisation fails. So the text is deserialised once more, walking the field's path,
//! and fails on purpose when the path ends: the error's location is the field's. Recipes are a few
//! hundred bytes; this runs only for messages.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

enum Seg {
    Key(String),
    Index(usize),
}

/// `models[1].parameters.weight` → [models, 1, parameters, weight].
fn segments(field: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in field.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            out.push(Seg::Key(key.to_string()));
        }
        for idx in rest.split('[') {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Seg::Index(i));
            }
        }
    }
    out
}

const HERE: &str = "stamerge-locate: here";

struct Walk<'a>(&'a [Seg]);

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.0.is_empty() {
            // Fail once the node's first event is read, so that the error carries its position.
            return d.deserialize_any(Here);
        }
        d.deserialize_any(self)
    }
}

/// Fails on whatever node it is given.
struct Here;

impl<'de> Visitor<'de> for Here {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(HERE)
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(HERE))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(HERE))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HERE))
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some(k) = m.next_key::<serde_yaml_ng::Value>()? {
            match &self.0[0] {
                Seg::Key(want) if k.as_str() == Some(want) => {
                    m.next_value_seed(Walk(&self.0[1..]))?
                }
                _ => m.next_value::<IgnoredAny>().map(|_| ())?,
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = match &self.0[0] {
                Seg::Index(want) if *want == i => s.next_element_seed(Walk(&self.0[1..]))?,
                _ => s.next_element::<IgnoredAny>()?.map(|_| ()),
            };
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The 1-based line of `field` in the recipe `text`, when it is there.
pub fn line(text: &str, field: &str) -> Option<usize> {
    let segs = segments(field);
    if segs.is_empty() {
        return None;
    }
    let e = Walk(&segs)
        .deserialize(serde_yaml_ng::Deserializer::from_str(text))
        .err()?;
    if !e.to_string().contains(HERE) {
        return None;
    }
    e.location().map(|l| l.line())
}

/// "`field` (line N)", or "`field`" when the line is not found.
pub fn field_at(text: &str, field: &str) -> String {
    match line(text, field) {
        Some(l) => format!("`{field}` (line {l})"),
        None => format!("`{field}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_and_flow_fields() {
        let t = "merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      density: [1, 0.7]\n      weight:\n        - filter: mlp\n          value: 0.5\n        - value: 0\nparameters: {normalize: true}\ntokenizer_source: union\nx:\n  y: 1\n  z:\n    - 2\n";
        assert_eq!(line(t, "tokenizer_source"), Some(11));
        assert_eq!(line(t, "x.z"), Some(15));
        assert_eq!(line(t, "x.z[0]"), Some(15));
        assert_eq!(line(t, "models[0].parameters.weight[0].value"), Some(8));
        assert_eq!(line(t, "models[0].parameters.weight[1].value"), Some(9));
        assert_eq!(line(t, "models[0].parameters.weight[0]"), Some(7));
        assert_eq!(line(t, "models[0].parameters.density"), Some(5));
        assert_eq!(line(t, "models[0].parameters.density[1]"), Some(5));
        assert_eq!(line(t, "parameters.normalize"), Some(10));
        assert_eq!(line(t, "models[3]"), None);
        assert_eq!(line(t, "nope"), None);
    }
}
