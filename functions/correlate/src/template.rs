//! Summary and root-cause templates of sequence rules.
//!
//! `{placeholder}` is replaced; `{{` and `}}` are literal braces.
//! Placeholders: `key`, `window`, `count` (all evidence), `count.<step>`,
//! `root.<ref>` (the root-cause event), `last.<ref>` (the newest evidence),
//! `step.<step>.<ref>` (the first event of a step), where `<ref>` is a field
//! reference ([`crate::observation`]). Alternatives are separated by `|`
//! (the first that resolves wins); an alternative may start with a quoted
//! label that is printed before its value when it wins, so a fallback says
//! what it printed: `{'pid ' root.data.victim.pid|'exit code ' root.data.exitCode}`.
//! A trailing `:bytes` formats a byte count (`268435456` → `256 MiB`).
//! Unresolved placeholders render as `?`.

use crate::observation::{Observation, check_reference};
use crate::vocabulary::Window;

pub struct Ctx<'a> {
    pub key: &'a str,
    pub window: Window,
    /// The rule's step names, in order (`per_step` follows them).
    pub steps: Vec<&'a str>,
    pub per_step: Vec<Vec<&'a Observation>>,
    pub root: &'a Observation,
    pub last: &'a Observation,
}

fn placeholders(template: &str) -> Result<Vec<(usize, usize, &str)>, String> {
    let mut out = Vec::new();
    let bytes = template.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' if bytes.get(i + 1) == Some(&b'{') => i += 2,
            b'}' if bytes.get(i + 1) == Some(&b'}') => i += 2,
            b'{' => {
                let end = template[i..]
                    .find('}')
                    .map(|e| i + e)
                    .ok_or_else(|| format!("template {template:?}: unclosed '{{'"))?;
                out.push((i, end + 1, &template[i + 1..end]));
                i = end + 1;
            }
            b'}' => return Err(format!("template {template:?}: stray '}}' (write '}}}}')")),
            _ => i += 1,
        }
    }
    Ok(out)
}

/// The field an alternative prints, for comparing alternatives: its last
/// path segment, lowercase, a `bytes` suffix aside (`memoryLimitBytes` and
/// enrich's `memorylimit` are one field).
fn field_name(reference: &str) -> String {
    let last = reference
        .rsplit('.')
        .next()
        .unwrap_or(reference)
        .to_lowercase();
    last.strip_suffix("bytes")
        .map(str::to_string)
        .unwrap_or(last)
}

/// Check every placeholder names something that exists, and that a
/// fallback chain says what it printed: alternatives naming different
/// fields each carry a label (`{'pid ' a.pid|'exit code ' b.exitCode}`), so
/// an exit code is never printed where a pid was meant.
pub fn check(template: &str, steps: &[&str]) -> Result<(), String> {
    for (_, _, body) in placeholders(template)? {
        let body = body.strip_suffix(":bytes").unwrap_or(body);
        let alternatives: Vec<(&str, &str)> = body
            .split('|')
            .map(labelled)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("template {template:?}: {e}"))?;
        let fields: std::collections::BTreeSet<String> =
            alternatives.iter().map(|(_, r)| field_name(r)).collect();
        if fields.len() > 1 && alternatives.iter().any(|(label, _)| label.is_empty()) {
            return Err(format!(
                "template {template:?}: {{{body}}} falls back between different fields ({}); label each alternative ('pid ' ...) so the text says which one it printed",
                fields.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        for alt in body.split('|') {
            let (_, alt) = labelled(alt).map_err(|e| format!("template {template:?}: {e}"))?;
            let ok = match alt {
                "key" | "window" | "count" => Ok(()),
                a => {
                    if let Some(step) = a.strip_prefix("count.") {
                        known_step(step, steps)
                    } else if let Some(r) =
                        a.strip_prefix("root.").or_else(|| a.strip_prefix("last."))
                    {
                        check_reference(r)
                    } else if let Some(rest) = a.strip_prefix("step.") {
                        let (step, r) = rest.split_once('.').unwrap_or((rest, ""));
                        known_step(step, steps).and_then(|()| check_reference(r))
                    } else {
                        Err(format!("unknown placeholder {a:?}"))
                    }
                }
            };
            ok.map_err(|e| format!("template {template:?}: {e}"))?;
        }
    }
    Ok(())
}

/// An alternative's label (`'pid '`) and reference.
fn labelled(alt: &str) -> Result<(&str, &str), String> {
    let alt = alt.trim();
    let Some(rest) = alt.strip_prefix('\'') else {
        return Ok(("", alt));
    };
    let end = rest
        .find('\'')
        .ok_or_else(|| format!("unclosed label in {alt:?}"))?;
    Ok((&rest[..end], rest[end + 1..].trim()))
}

fn known_step(name: &str, steps: &[&str]) -> Result<(), String> {
    if steps.contains(&name) {
        Ok(())
    } else {
        Err(format!("no step named {name:?}"))
    }
}

fn resolve(alt: &str, ctx: &Ctx<'_>) -> Option<String> {
    match alt {
        "key" => Some(ctx.key.to_string()),
        "window" => Some(ctx.window.to_string()),
        "count" => Some(ctx.per_step.iter().map(Vec::len).sum::<usize>().to_string()),
        a => {
            if let Some(step) = a.strip_prefix("count.") {
                let i = ctx.steps.iter().position(|s| *s == step)?;
                Some(ctx.per_step[i].len().to_string())
            } else if let Some(r) = a.strip_prefix("root.") {
                ctx.root.value(r)
            } else if let Some(r) = a.strip_prefix("last.") {
                ctx.last.value(r)
            } else if let Some(rest) = a.strip_prefix("step.") {
                let (step, r) = rest.split_once('.')?;
                let i = ctx.steps.iter().position(|s| *s == step)?;
                ctx.per_step[i].iter().find_map(|o| o.value(r))
            } else {
                None
            }
        }
    }
}

pub fn render(template: &str, ctx: &Ctx<'_>) -> String {
    let Ok(spots) = placeholders(template) else {
        return template.to_string();
    };
    let mut out = String::new();
    let mut from = 0;
    for (start, end, body) in spots {
        out.push_str(&template[from..start].replace("{{", "{").replace("}}", "}"));
        let (body, bytes) = match body.strip_suffix(":bytes") {
            Some(b) => (b, true),
            None => (body, false),
        };
        let value = body.split('|').find_map(|a| {
            let (label, reference) = labelled(a).ok()?;
            resolve(reference, ctx).map(|v| (label, v))
        });
        out.push_str(&match value {
            Some((label, v)) if bytes => format!("{label}{}", human_bytes(&v)),
            Some((label, v)) => format!("{label}{v}"),
            None => "?".into(),
        });
        from = end;
    }
    out.push_str(&template[from..].replace("{{", "{").replace("}}", "}"));
    out
}

/// `268435456` → `256 MiB`; anything not a number is returned as is.
pub fn human_bytes(v: &str) -> String {
    let Ok(n) = v.parse::<f64>() else {
        return v.to_string();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", units[unit])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_readable() {
        assert_eq!(human_bytes("268435456"), "256 MiB");
        assert_eq!(human_bytes("1536"), "1.5 KiB");
        assert_eq!(human_bytes("x"), "x");
    }

    #[test]
    fn a_fallback_says_what_it_printed() {
        let template = "({'pid ' root.data.victim.pid|'exit code ' root.data.exitCode})";
        assert!(check(template, &[]).is_ok());
        assert!(
            check("{'pid root.data.x}", &[])
                .expect_err("refused")
                .contains("unclosed label")
        );
        let kernel = crate::observation::tests::obs(
            "k",
            "t",
            1,
            None,
            serde_json::json!({"victim": {"pid": 4242}, "exitCode": 137}),
        );
        let restart =
            crate::observation::tests::obs("r", "t", 1, None, serde_json::json!({"exitCode": 137}));
        let ctx = |root| Ctx {
            key: "k",
            window: Window::default(),
            steps: vec![],
            per_step: vec![],
            root,
            last: root,
        };
        assert_eq!(render(template, &ctx(&kernel)), "(pid 4242)");
        assert_eq!(render(template, &ctx(&restart)), "(exit code 137)");
    }

    #[test]
    fn bad_templates_are_named() {
        assert!(check("ok {key} {{literal}}", &[]).is_ok());
        assert!(check("{nope}", &[]).expect_err("refused").contains("nope"));
        assert!(
            check("{count.missing}", &[])
                .expect_err("refused")
                .contains("missing")
        );
        assert!(
            check("{root.data.x", &[])
                .expect_err("refused")
                .contains("unclosed")
        );
        // A pid falling back to an exit code, unlabelled: refused.
        let err = check("{root.data.victim.pid|root.data.exitCode}", &[]).expect_err("refused");
        assert!(err.contains("label each alternative"), "{err}");
        // The same field from another place needs no label.
        assert!(check("{root.data.container|root.ext.container}", &[]).is_ok());
        assert!(
            check(
                "{root.data.memoryLimitBytes|root.ext.memorylimit:bytes}",
                &[]
            )
            .is_ok()
        );
    }

    /// An observation on which exactly `reference` resolves, to `value`.
    fn with(reference: &str, value: &str) -> Observation {
        let mut o = crate::observation::tests::obs("", "", 0, None, serde_json::json!({}));
        o.id = String::new();
        o.source = String::new();
        if let Some(path) = reference.strip_prefix("data.") {
            let mut data = serde_json::Value::String(value.to_string());
            for segment in path.rsplit('.') {
                data = serde_json::json!({ segment: data });
            }
            o.data = data;
        } else if let Some(name) = reference.strip_prefix("ext.") {
            o.ext.insert(name.to_string(), value.to_string());
        } else if let Some(kind) = reference.strip_prefix("subject.") {
            o.subject = Some(format!("{kind}/{value}"));
        } else {
            match reference {
                "id" => o.id = value.to_string(),
                "type" => o.ty = value.to_string(),
                "subject" => o.subject = Some(value.to_string()),
                "source.node" => o.source = format!("/tidewatch/x/{value}"),
                "pod" => o.subject = Some(format!("pod/{value}")),
                r => panic!("no way to set {r}"),
            }
        }
        o
    }

    /// Every fallback of every template of every shipped rule, taken one at
    /// a time: the text shows that alternative's label and value, never
    /// another's.
    #[test]
    fn every_shipped_fallback_says_what_it_printed() {
        let mut taken = 0;
        for rule in crate::rules::RulesFile::builtin().sequence {
            let steps: Vec<&str> = rule.steps.iter().map(|s| s.name.as_str()).collect();
            for template in [&rule.summary, &rule.root_cause] {
                for (_, _, body) in placeholders(template).expect("valid") {
                    let (chain, bytes) = match body.strip_suffix(":bytes") {
                        Some(b) => (b, true),
                        None => (body, false),
                    };
                    let alternatives: Vec<(&str, &str)> = chain
                        .split('|')
                        .map(|a| labelled(a).expect("label"))
                        .collect();
                    if alternatives.len() < 2 {
                        continue;
                    }
                    for (j, (label, reference)) in alternatives.iter().enumerate() {
                        let value = if bytes {
                            "268435456".to_string()
                        } else {
                            format!("value-{j}")
                        };
                        let empty = with("id", "");
                        let (place, field) = reference.split_once('.').expect("a reference");
                        let (step, field) = match place {
                            "step" => field
                                .split_once('.')
                                .map(|(s, f)| (Some(s), f))
                                .expect("step ref"),
                            _ => (None, field),
                        };
                        let set = with(field, &value);
                        let per_step: Vec<Vec<&Observation>> = steps
                            .iter()
                            .map(|s| {
                                if step == Some(*s) {
                                    vec![&set]
                                } else {
                                    vec![&empty]
                                }
                            })
                            .collect();
                        let ctx = Ctx {
                            key: "k",
                            window: Window::default(),
                            steps: steps.clone(),
                            per_step,
                            root: if place == "root" { &set } else { &empty },
                            last: if place == "last" { &set } else { &empty },
                        };
                        let shown = if bytes {
                            human_bytes(&value)
                        } else {
                            value.clone()
                        };
                        let rendered = render(&format!("{{{body}}}"), &ctx);
                        assert_eq!(
                            rendered,
                            format!("{label}{shown}"),
                            "rule {} template {template:?}: alternative {j} ({reference})",
                            rule.name
                        );
                        taken += 1;
                    }
                }
            }
        }
        assert!(taken >= 10, "only {taken} fallbacks in the shipped rules?");
    }
}
