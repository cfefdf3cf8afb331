//! countryinfo (PyPI `countryinfo==1.0.1`): one JSON object per country, turned into
//! templated factoid questions. List-valued fields are JSON arrays (a few older records hold
//! Python-repr strings such as `"['EUR']"`, which [`py_list`] reads).

use std::path::Path;

use serde_json::Value;

use super::{read, DataError, QaExample};

/// A question template: id suffix, question, and how to read the answer from the country.
type Template = (
    &'static str,
    fn(&str) -> String,
    fn(&Value) -> Option<String>,
);

fn field(key: &'static str) -> impl Fn(&Value) -> Option<String> {
    move |c| {
        c.get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
    }
}

const TEMPLATES: &[Template] = &[
    (
        "capital",
        |n| format!("What is the capital of {n}?"),
        |c| field("capital")(c),
    ),
    (
        "region",
        |n| format!("In which region of the world is {n}?"),
        |c| field("region")(c),
    ),
    (
        "subregion",
        |n| format!("In which subregion of the world is {n}?"),
        |c| field("subregion")(c),
    ),
    (
        "demonym",
        |n| format!("What is the demonym for people from {n}?"),
        |c| field("demonym")(c),
    ),
    (
        "currency",
        |n| format!("What is the ISO 4217 code of the currency of {n}?"),
        |c| first(c, "currencies"),
    ),
    (
        "calling_code",
        |n| format!("What is the international calling code of {n}?"),
        |c| first(c, "callingCodes").map(|s| format!("+{s}")),
    ),
    (
        "tld",
        |n| format!("What is the country-code top-level domain of {n}?"),
        |c| first(c, "tld"),
    ),
    (
        "iso3",
        |n| format!("What is the ISO 3166-1 alpha-3 code of {n}?"),
        |c| {
            let v = c.get("ISO")?.get("alpha3")?.as_str()?.trim();
            (!v.is_empty()).then(|| v.to_string())
        },
    ),
    (
        "borders",
        |n| format!("How many countries share a land border with {n}?"),
        |c| list(c, "borders").map(|v| v.len().to_string()),
    ),
];

/// A list field: a JSON array of strings, or a Python-repr string of one.
fn list(c: &Value, key: &str) -> Option<Vec<String>> {
    match c.get(key)? {
        Value::Array(v) => Some(
            v.iter()
                .filter_map(Value::as_str)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        Value::String(s) => Some(py_list(s)),
        _ => None,
    }
}

fn first(c: &Value, key: &'static str) -> Option<String> {
    list(c, key).and_then(|v| v.into_iter().next())
}

/// Reads a Python-repr list of strings (`"['a', 'b']"`); anything else yields no items.
pub fn py_list(s: &str) -> Vec<String> {
    let s = s.trim();
    let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return Vec::new();
    };
    inner
        .split(", ")
        .map(|x| x.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Loads every `*.json` in `dir` (sorted by file name) and emits one example per template
/// whose answer is present; ids are `<file stem>/<template>`.
pub fn load(dir: &Path) -> Result<Vec<QaExample>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let country: Value =
            serde_json::from_slice(&read(&path)?).map_err(|e| DataError::Format {
                path: path.display().to_string(),
                message: format!("not JSON: {e}"),
            })?;
        let Some(name) = field("name")(&country) else {
            return Err(DataError::Format {
                path: path.display().to_string(),
                message: "no \"name\" field".into(),
            });
        };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (key, question, answer) in TEMPLATES {
            if let Some(a) = answer(&country) {
                out.push(QaExample {
                    id: format!("{stem}/{key}"),
                    prompt: question(&name),
                    answers: vec![a],
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_python_lists() {
        assert_eq!(py_list("['AND', 'BEL']"), ["AND", "BEL"]);
        assert!(py_list("[]").is_empty());
        assert!(py_list("EUR").is_empty());
    }
}
