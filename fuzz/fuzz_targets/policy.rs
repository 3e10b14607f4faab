//! The sidecar's policy parser on arbitrary text: parsing and validating
//! never panics; a refusal names every field at fault (or, for text that is
//! not a policy at all, where in the text); an accepted policy is accepted
//! again, unchanged, from the JSON it serialises to — the form the operator
//! writes into the ConfigMap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_policy::{PolicyError, SidecarPolicy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match SidecarPolicy::from_json(text) {
        Ok(policy) => {
            let json = policy.to_json();
            let again = SidecarPolicy::from_json(&json).unwrap_or_else(|e| {
                panic!("an accepted policy is refused from its own JSON: {e}\n{json}")
            });
            assert_eq!(
                again, policy,
                "the policy changed through its own JSON:\n{json}"
            );
        }
        Err(PolicyError::Invalid(errors)) => {
            assert!(!errors.is_empty(), "refused without a reason");
            for e in &errors {
                assert!(
                    !e.field.is_empty()
                        && e.field
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"[].".contains(&b)),
                    "a refusal must name a field path: {e:?}"
                );
                assert!(!e.message.is_empty(), "a refusal must say why: {e:?}");
            }
        }
        Err(e @ PolicyError::Parse(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("line ") && msg.contains("column "),
                "a parse error must say where: {msg}"
            );
        }
    }
});
