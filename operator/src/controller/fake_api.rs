//! A fake apiserver for the reconcile's unit tests, in the style of
//! kube-rs's controller-rs fixtures: a [`Client`] whose every request is
//! recorded (method, path and query, JSON body) and answered from what the
//! fake holds. A server-side apply stores and echoes its object with a new
//! resourceVersion; a GET answers a stored object or 404; a DELETE removes
//! one; an Event is accepted. Tests then read the requests, so a planner
//! mistake (a write too many, one missing, the wrong order) fails in
//! milliseconds without a cluster.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::{Client, client::Body};
use serde_json::{Value, json};

/// One request the fake received.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query, if any.
    pub query: String,
    /// The body, when it was JSON.
    pub body: Option<Value>,
    /// The `Accept` header: what representation was asked for.
    pub accept: String,
}

impl Seen {
    /// `"PATCH …/deployments/order"`: what a failed assertion prints.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    objects: HashMap<String, Value>,
    resource_version: u64,
}

/// The fake; cheap to clone, every clone sees the same state.
#[derive(Clone, Default)]
pub(super) struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    /// A fake holding nothing, and a client of it.
    pub fn new() -> (Self, Client) {
        let fake = Self::default();
        let serving = fake.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let fake = serving.clone();
            async move { Ok::<_, Infallible>(fake.answer(req).await) }
        });
        (fake, Client::new(service, "default"))
    }

    /// Makes a GET of `path` answer `object`.
    pub fn hold(&self, path: &str, object: Value) {
        self.0
            .lock()
            .unwrap()
            .objects
            .insert(path.to_owned(), object);
    }

    /// The object at `path`, as last applied.
    pub fn object(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().seen.clone()
    }

    /// Every request that would change something (all but GET), as lines.
    pub fn writes(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.method != Method::GET)
            .map(Seen::line)
            .collect()
    }

    /// Forgets the requests so far (the objects stay).
    pub fn clear(&self) {
        self.0.lock().unwrap().seen.clear();
    }

    async fn answer(&self, req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let mut state = self.0.lock().unwrap();
        let accept = parts
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        state.seen.push(Seen {
            method: parts.method.clone(),
            path: path.clone(),
            query,
            body: body.clone(),
            accept,
        });
        match parts.method {
            Method::GET => match state.objects.get(&path) {
                Some(o) => respond(StatusCode::OK, o.clone()),
                None => not_found(&path),
            },
            Method::PATCH => {
                let body = body.unwrap_or(Value::Null);
                // A status patch changes the status of the object held.
                let (key, mut object) = match path.strip_suffix("/status") {
                    Some(key) => {
                        let Some(mut held) = state.objects.get(key).cloned() else {
                            return not_found(key);
                        };
                        held["status"] = body["status"].clone();
                        (key.to_owned(), held)
                    }
                    None => (path.clone(), body),
                };
                state.resource_version += 1;
                object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                state.objects.insert(key, object.clone());
                respond(StatusCode::OK, object)
            }
            Method::DELETE => match state.objects.remove(&path) {
                Some(_) => respond(
                    StatusCode::OK,
                    json!({"kind": "Status", "status": "Success"}),
                ),
                None => not_found(&path),
            },
            // Events.
            Method::POST => respond(StatusCode::CREATED, body.unwrap_or(Value::Null)),
            _ => respond(StatusCode::METHOD_NOT_ALLOWED, json!({})),
        }
    }
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    let mut rsp = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn not_found(path: &str) -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("{path} not found"),
            "reason": "NotFound",
            "code": 404,
        }),
    )
}
