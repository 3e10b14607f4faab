//! TokenReview against the apiserver: the projected token's signature,
//! expiry, audience and bound pod, all checked by Kubernetes itself.

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use trellis_identity::api::TOKEN_AUDIENCE;

use super::certifier::{Review, TokenReviewer};

/// Reviews tokens with the apiserver's TokenReview API (the chart grants
/// `create` on `tokenreviews` to the identity service alone).
#[derive(Clone)]
pub struct KubeReviewer(pub Client);

/// The ServiceAccount a TokenReview's username names
/// (`system:serviceaccount:<namespace>:<name>`).
pub fn service_account(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':'))
        .then(|| (ns.to_owned(), name.to_owned()))
}

impl TokenReviewer for KubeReviewer {
    fn review(&self, token: &str) -> BoxFuture<'static, Result<Review, String>> {
        let api: Api<TokenReview> = Api::all(self.0.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        Box::pin(async move {
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("TokenReview failed: {e}"))?;
            let Some(status) = answer.status else {
                return Err("TokenReview answered without a status".into());
            };
            if status.authenticated != Some(true) {
                return Ok(Review::Refused(format!(
                    "the token is not valid for audience {TOKEN_AUDIENCE}: {}",
                    status.error.unwrap_or_else(|| "not authenticated".into())
                )));
            }
            if !status
                .audiences
                .unwrap_or_default()
                .iter()
                .any(|a| a == TOKEN_AUDIENCE)
            {
                return Ok(Review::Refused(format!(
                    "the token is not for audience {TOKEN_AUDIENCE}"
                )));
            }
            let username = status.user.and_then(|u| u.username).unwrap_or_default();
            Ok(match service_account(&username) {
                Some((namespace, name)) => Review::ServiceAccount { namespace, name },
                None => Review::Refused(format!("{username:?} is not a ServiceAccount")),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::service_account;

    #[test]
    fn only_service_account_usernames_name_one() {
        assert_eq!(
            service_account("system:serviceaccount:shop:order"),
            Some(("shop".into(), "order".into()))
        );
        for other in [
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::order",
            "system:serviceaccount:shop:order:x",
            "system:node:kind",
        ] {
            assert_eq!(service_account(other), None, "{other}");
        }
    }
}
