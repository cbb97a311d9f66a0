//! An event's metadata, a Python dict, written as JSON by the writer itself
//! (the binding side of `AppendWriter.log_event`, issue 9).
//!
//! The bytes are exactly those of `orjson.dumps(metadata,
//! option=OPT_NON_STR_KEYS)` (what the logger wrote before, checked by a
//! property test against orjson): strings escaped as orjson escapes them (`"`,
//! `\`, and control characters; everything else raw UTF-8), integers in 64
//! bits, floats shortest round-trip (`1e+16`, `0.00001`), NaN and infinities
//! `null`. With the writer's sanitizer on, every string value and key is
//! scrubbed in the same walk, as `sanitize::sanitize_json` scrubs orjson's
//! output: a non-empty string under a credential-named key becomes
//! `***REDACTED***`, a scrubbed key that would repeat a key of its dict is
//! renamed (`sanitize::unique_key`).
//!
//! Only the plain types are written here: exact `dict` with `str` keys,
//! `list`, `tuple`, `str`, `int` (in 64 bits), `float`, `bool` and `None`,
//! nested at most `MAX_DEPTH` levels. Anything else (subclasses, other key
//! types, other objects, an integer beyond 64 bits, a string orjson refuses,
//! deeper nesting, which includes circular references) declines: the caller
//! takes the Python path, which handles every case as before.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyList, PyString, PyTuple};
use pyo3::PyTypeInfo;

use crate::sanitize;

/// The deepest nesting written here (`sigil.core.limits.MAX_METADATA_DEPTH`):
/// deeper metadata is cut by the Python path.
pub const MAX_DEPTH: usize = 64;

/// The type objects compared against (exact types only).
struct Types {
    str_: *mut ffi::PyTypeObject,
    int: *mut ffi::PyTypeObject,
    float: *mut ffi::PyTypeObject,
    bool_: *mut ffi::PyTypeObject,
    none: *mut ffi::PyTypeObject,
    dict: *mut ffi::PyTypeObject,
    list: *mut ffi::PyTypeObject,
    tuple: *mut ffi::PyTypeObject,
}

/// Writes one metadata dict; `false` from any method means "declined" (the
/// output is then garbage and must be discarded).
pub struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    sanitize: bool,
    /// Declines once the output passes this many bytes (the caller's bound).
    limit: usize,
    types: Types,
}

impl<'a> Encoder<'a> {
    pub fn new(py: Python<'_>, out: &'a mut Vec<u8>, sanitize: bool, limit: usize) -> Self {
        let types = Types {
            str_: PyString::type_object_raw(py),
            int: pyo3::types::PyInt::type_object_raw(py),
            float: PyFloat::type_object_raw(py),
            bool_: pyo3::types::PyBool::type_object_raw(py),
            none: py.None().bind(py).get_type_ptr(),
            dict: PyDict::type_object_raw(py),
            list: PyList::type_object_raw(py),
            tuple: PyTuple::type_object_raw(py),
        };
        Encoder {
            out,
            sanitize,
            limit,
            types,
        }
    }

    /// The metadata object (nesting level 1).
    pub fn dict(&mut self, d: &Bound<'_, PyDict>, level: usize) -> bool {
        if level > MAX_DEPTH {
            return false;
        }
        self.out.push(b'{');
        let mut first = true;
        // The names given to scrubbed keys (`sanitize::unique_key`).
        let mut given: Vec<String> = Vec::new();
        for (k, v) in d.iter() {
            if k.get_type_ptr() != self.types.str_ {
                return false;
            }
            // SAFETY: the type was just checked to be exactly `str`.
            let k = unsafe { k.cast_unchecked::<PyString>() };
            let Ok(key) = k.to_str() else { return false };
            if !first {
                self.out.push(b',');
            }
            first = false;
            match self.sanitize.then(|| sanitize::sanitize(key)) {
                Some(std::borrow::Cow::Owned(scrubbed)) => {
                    let name = sanitize::unique_key(
                        scrubbed,
                        &mut |n| d.contains(n).unwrap_or(false),
                        &given,
                    );
                    push_str(self.out, &name);
                    given.push(name);
                }
                _ => push_str(self.out, key),
            }
            self.out.push(b':');
            if !self.value(&v, level, Some(key)) {
                return false;
            }
        }
        self.out.push(b'}');
        self.out.len() <= self.limit
    }

    fn seq<'py>(&mut self, items: impl Iterator<Item = Bound<'py, PyAny>>, level: usize) -> bool {
        if level > MAX_DEPTH {
            return false;
        }
        self.out.push(b'[');
        let mut first = true;
        for item in items {
            if !first {
                self.out.push(b',');
            }
            first = false;
            if !self.value(&item, level, None) {
                return false;
            }
        }
        self.out.push(b']');
        self.out.len() <= self.limit
    }

    /// One value inside a container at `level`; `key` is its key when the
    /// container is a dict.
    fn value(&mut self, v: &Bound<'_, PyAny>, level: usize, key: Option<&str>) -> bool {
        let t = v.get_type_ptr();
        let ty = &self.types;
        if t == ty.str_ {
            // SAFETY: the type was just checked to be exactly `str`.
            let s = unsafe { v.cast_unchecked::<PyString>() };
            let Ok(text) = s.to_str() else { return false };
            if self.sanitize {
                self.scrubbed(text, key);
            } else {
                push_str(self.out, text);
            }
            true
        } else if t == ty.int {
            if let Ok(n) = v.extract::<i64>() {
                push_i64(self.out, n);
            } else if let Ok(n) = v.extract::<u64>() {
                self.out
                    .extend_from_slice(crate::writer::itoa_u64(n, &mut [0u8; 20]));
            } else {
                return false;
            }
            true
        } else if t == ty.float {
            // SAFETY: the type was just checked to be exactly `float`.
            let f = unsafe { v.cast_unchecked::<PyFloat>() }.value();
            push_f64(self.out, f);
            true
        } else if t == ty.bool_ {
            // SAFETY: comparing with the `True` singleton's address.
            let truth = v.as_ptr() == unsafe { ffi::Py_True() };
            self.out
                .extend_from_slice(if truth { b"true" } else { b"false" });
            true
        } else if t == ty.none {
            self.out.extend_from_slice(b"null");
            true
        } else if t == ty.dict {
            // SAFETY: the type was just checked to be exactly `dict`.
            self.dict(unsafe { v.cast_unchecked::<PyDict>() }, level + 1)
        } else if t == ty.list {
            // SAFETY: the type was just checked to be exactly `list`.
            let l = unsafe { v.cast_unchecked::<PyList>() };
            self.seq(l.iter(), level + 1)
        } else if t == ty.tuple {
            // SAFETY: the type was just checked to be exactly `tuple`.
            let l = unsafe { v.cast_unchecked::<PyTuple>() };
            self.seq(l.iter(), level + 1)
        } else {
            false
        }
    }

    /// A string value scrubbed as `sanitize::sanitize_json` scrubs it.
    fn scrubbed(&mut self, text: &str, key: Option<&str>) {
        if key.is_some_and(|k| !text.is_empty() && sanitize::is_sensitive_key(k)) {
            push_str(self.out, sanitize::REDACTED);
        } else {
            push_str(self.out, &sanitize::sanitize(text));
        }
    }
}

/// A JSON string as orjson writes it (and `parse::push_json_str`).
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    crate::writer::push_json_str(out, s);
}

fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(crate::writer::itoa_u64(n.unsigned_abs(), &mut [0u8; 20]));
}

/// A float as orjson writes it: shortest round-trip digits (the same
/// formatter, `zmij`, through serde_json), NaN and infinities `null`.
fn push_f64(out: &mut Vec<u8>, f: f64) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_push_json_str_escapes_them() {
        for s in [
            "",
            "plain",
            "é ☃ 𝄞",
            "a\"b\\c",
            "\u{0}\u{1f}\n\t\r\u{8}\u{c}\u{7f}",
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            push_str(&mut a, s);
            crate::parse::push_json_str(&mut b, s);
            assert_eq!(a, b, "{s:?}");
        }
    }

    #[test]
    fn numbers_are_written_as_orjson_writes_them() {
        let mut out = Vec::new();
        for (f, want) in [
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (1.5e-5, "0.000015"),
            (1e-7, "1e-7"),
            (2100.5, "2100.5"),
            (f64::NAN, "null"),
            (f64::INFINITY, "null"),
        ] {
            out.clear();
            push_f64(&mut out, f);
            assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        }
        for (n, want) in [(i64::MIN, "-9223372036854775808"), (0, "0"), (-5, "-5")] {
            out.clear();
            push_i64(&mut out, n);
            assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        }
    }
}
