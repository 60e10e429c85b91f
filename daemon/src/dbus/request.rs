//! One Generate call on the bus: the `org.gemmad.Gemmad1.Request` object its caller
//! can cancel, and the task that turns the core's events into signals sent to that
//! caller only, then removes the object.

use std::sync::Arc;

use tokio::sync::Notify;
use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedObjectPath};

use super::callers::Callers;
use super::convert::{self, Dict, Error};
use crate::core::types::Event;
use crate::core::Submission;

/// The request object at `/org/gemmad/Gemmad1/request/<id>`.
pub struct Request {
    owner: UniqueName<'static>,
    cancel: Arc<Notify>,
}

#[interface(name = "org.gemmad.Gemmad1.Request")]
impl Request {
    /// Stops the generation; it ends with `Finished("cancelled", ...)`.
    async fn cancel(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), Error> {
        match hdr.sender() {
            Some(s) if *s == self.owner => {
                self.cancel.notify_one();
                Ok(())
            }
            _ => Err(Error::PermissionDenied(
                "only the caller that started a request may cancel it".into(),
            )),
        }
    }

    /// New text and its token ids.
    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, text: &str, ids: &[u32]) -> zbus::Result<()>;

    /// The end: the reason and the usage and timings.
    #[zbus(signal)]
    async fn finished(
        emitter: &SignalEmitter<'_>,
        reason: &str,
        usage_and_timings: Dict,
    ) -> zbus::Result<()>;

    /// The request failed after it was queued.
    #[zbus(signal)]
    async fn failed(
        emitter: &SignalEmitter<'_>,
        error_name: &str,
        message: &str,
    ) -> zbus::Result<()>;
}

/// Registers the request object for `sub` and starts the task that streams its events
/// to `owner`. Returns the object's path.
pub async fn start(
    conn: &zbus::Connection,
    callers: &Arc<Callers>,
    owner: UniqueName<'static>,
    sub: Submission,
) -> Result<OwnedObjectPath, Error> {
    let id = sub.id();
    let path = OwnedObjectPath::try_from(format!("{}/{id}", super::REQUEST_PREFIX))
        .map_err(|e| Error::Internal(format!("request path: {e}")))?;
    let cancel = Arc::new(Notify::new());
    conn.object_server()
        .at(
            &path,
            Request {
                owner: owner.clone(),
                cancel: cancel.clone(),
            },
        )
        .await?;
    if !callers.add_request(owner.as_str(), id, cancel.clone()) {
        // The caller left between its call and now.
        cancel.notify_one();
    }
    tokio::spawn(forward(
        conn.clone(),
        callers.clone(),
        path.clone(),
        owner,
        sub,
        cancel,
    ));
    Ok(path)
}

/// Sends the events of one request as unicast signals until its end.
async fn forward(
    conn: zbus::Connection,
    callers: Arc<Callers>,
    path: OwnedObjectPath,
    owner: UniqueName<'static>,
    mut sub: Submission,
    cancel: Arc<Notify>,
) {
    let id = sub.id();
    // Lets the method's reply, which names this path, go out before the first signal.
    tokio::task::yield_now().await;
    let emitter = match SignalEmitter::new(&conn, path.clone()) {
        Ok(e) => e.set_destination(BusName::Unique(owner.clone())),
        Err(e) => {
            tracing::error!(request_id = id, error = %e, "cannot address the request's signals");
            return;
        }
    };
    let mut completion = 0usize;
    let sent = loop {
        let event = tokio::select! {
            biased;
            _ = cancel.notified() => None,
            // `None`: the queue dropped it (cancelled elsewhere).
            e = std::future::poll_fn(|cx| sub.poll_event(cx)) => e,
        };
        match event {
            None => {
                drop(sub);
                let mut usage = Dict::new();
                usage.insert("request_id".into(), id.into());
                usage.insert(
                    "completion_tokens".into(),
                    u32::try_from(completion).unwrap_or(u32::MAX).into(),
                );
                break Request::finished(&emitter, "cancelled", usage).await;
            }
            Some(Event::Queued { .. } | Event::Started { .. }) => continue,
            Some(Event::Delta { mut text, mut ids }) => {
                // Deltas already waiting go out as one signal (a slow bus gets fewer).
                let mut end = None;
                while let Some(next) = sub.try_event() {
                    match next {
                        Event::Delta { text: t, ids: i } => {
                            text.push_str(&t);
                            ids.extend(i);
                        }
                        other => {
                            end = Some(other);
                            break;
                        }
                    }
                }
                completion += ids.len();
                if let Err(e) = Request::token(&emitter, &convert::dbus_text(text), &ids).await {
                    break Err(e);
                }
                match end {
                    None => continue,
                    Some(e) => match finish(&emitter, id, e).await {
                        Some(r) => break r,
                        None => continue,
                    },
                }
            }
            Some(e) => match finish(&emitter, id, e).await {
                Some(r) => break r,
                None => continue,
            },
        }
    };
    if let Err(e) = sent {
        tracing::debug!(request_id = id, caller = %owner, error = %e, "cannot send a request's signal; the caller is gone");
    }
    callers.remove_request(owner.as_str(), id);
    if let Err(e) = conn.object_server().remove::<Request, _>(&path).await {
        tracing::debug!(request_id = id, error = %e, "request object already gone");
    }
}

/// Sends the last signal for `e` if it is a last event; `None` otherwise.
async fn finish(emitter: &SignalEmitter<'_>, id: u64, e: Event) -> Option<zbus::Result<()>> {
    match e {
        Event::Finished(f) => Some(
            Request::finished(
                emitter,
                convert::finish_reason(f.reason),
                convert::usage(id, &f),
            )
            .await,
        ),
        Event::Failed(err) => {
            let message = convert::dbus_text(err.to_string());
            Some(Request::failed(emitter, convert::error_name(&err), &message).await)
        }
        _ => None,
    }
}
