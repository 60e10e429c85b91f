//! A running generation: the request object's signals, subscribed to before Generate is
//! called, read back as `pb` events.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};
use zbus::message::Type as MessageType;
use zbus::names::{BusName, OwnedUniqueName};
use zbus::{Connection, MatchRule, Message, MessageStream, OwnedObjectPath, OwnedVariant};

use super::reply::{deserialize, finished_from_signal, Fields};
use super::{
    call_error, status_from_error_name, Bus, BUS_NAME, DBUS_NAME, DBUS_PATH, REQUEST_INTERFACE,
    REQUEST_PATH_NAMESPACE,
};
use crate::{pb, ClientError};

/// The request signals of every generation this connection starts; one generation keeps
/// those of its own path.
pub(super) fn request_rule() -> MatchRule<'static> {
    MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(BUS_NAME)
        .interface(REQUEST_INTERFACE)
        .path_namespace(REQUEST_PATH_NAMESPACE)
        .build()
        .expect("a valid constant match rule")
}

/// gemmad's name changing hands: the signal that it left mid-generation.
pub(super) fn owner_rule() -> MatchRule<'static> {
    MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(DBUS_NAME)
        .interface(DBUS_NAME)
        .member("NameOwnerChanged")
        .path(DBUS_PATH)
        .arg(0, BUS_NAME)
        .build()
        .expect("a valid constant match rule")
}

/// Awaits `call` while moving the signals that arrive meanwhile into `early`: zbus stalls
/// the connection, reply included, while a subscriber's queue is full.
pub(super) async fn drain_while<F>(
    call: F,
    signals: &mut MessageStream,
    early: &mut VecDeque<Message>,
) -> zbus::Result<Message>
where
    F: std::future::Future<Output = zbus::Result<Message>>,
{
    tokio::pin!(call);
    loop {
        tokio::select! {
            biased;
            r = &mut call => return r,
            m = signals.next() => match m {
                Some(Ok(m)) => early.push_back(m),
                // Errors and the end of the stream come again to its reader.
                Some(Err(_)) | None => return call.await,
            },
        }
    }
}

/// A running generation over D-Bus: the request object's signals as `pb` events.
///
/// Read it with [`message`](DbusGeneration::message) (like tonic's `Streaming`) or as a
/// [`Stream`]. It yields `Delta`s and a final `Finished`; a `Failed` signal, or gemmad
/// leaving the bus, ends it with an error; a cancelled request with `CANCELLED`.
pub struct DbusGeneration {
    pub(super) conn: Connection,
    pub(super) bus: Bus,
    pub(super) path: OwnedObjectPath,
    /// The daemon's unique name (the reply's sender): only its signals count.
    pub(super) daemon: Option<OwnedUniqueName>,
    pub(super) early: VecDeque<Message>,
    pub(super) signals: MessageStream,
    pub(super) owner: MessageStream,
    pub(super) request_id: Option<u64>,
    pub(super) done: bool,
}

impl fmt::Debug for DbusGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbusGeneration")
            .field("path", &self.path.as_str())
            .field("request_id", &self.request_id)
            .field("done", &self.done)
            .finish()
    }
}

impl DbusGeneration {
    /// The request object's path.
    pub fn path(&self) -> &OwnedObjectPath {
        &self.path
    }

    /// The daemon's id of the request, once `Finished` has said it.
    pub fn request_id(&self) -> Option<u64> {
        self.request_id
    }

    /// The next event, or `None` after `Finished`.
    pub async fn message(&mut self) -> Result<Option<pb::GenerateResponse>, ClientError> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx))
            .await
            .transpose()
    }

    /// Stops the generation (`Request.Cancel`); the stream then ends with `CANCELLED`. A
    /// request that has already ended is not an error.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        if self.done {
            return Ok(());
        }
        let dest = self.destination();
        let call = self.conn.call_method(
            Some(dest),
            self.path.as_ref(),
            Some(REQUEST_INTERFACE),
            "Cancel",
            &(),
        );
        match drain_while(call, &mut self.signals, &mut self.early).await {
            Ok(_) => Ok(()),
            Err(e) => match call_error(&self.bus, "Cancel", e) {
                // The object is removed when the request ends.
                ClientError::Rpc(s) if s.code() == Code::Unimplemented => Ok(()),
                other => Err(other),
            },
        }
    }

    fn destination(&self) -> BusName<'static> {
        match &self.daemon {
            Some(u) => BusName::from(u.clone()),
            None => BusName::try_from(BUS_NAME).expect("a valid constant bus name"),
        }
    }

    fn finish(
        &mut self,
        item: Result<pb::GenerateResponse, ClientError>,
    ) -> Poll<Option<Result<pb::GenerateResponse, ClientError>>> {
        self.done = true;
        Poll::Ready(Some(item))
    }

    /// The event a signal stands for, if it is one of this request's.
    fn event(&mut self, msg: &Message) -> Option<Result<pb::GenerateResponse, ClientError>> {
        let hdr = msg.header();
        if hdr.path().map(|p| p.as_str()) != Some(self.path.as_str()) {
            return None;
        }
        if let (Some(want), Some(got)) = (&self.daemon, hdr.sender()) {
            if want.as_str() != got.as_str() {
                return None;
            }
        }
        let member = hdr.member()?.as_str();
        let what = format!("the {member} signal of {}", self.path.as_str());
        match member {
            "Token" => Some(deserialize::<(String, Vec<u32>)>(msg, &what).map(
                |(text, token_ids)| {
                    event(pb::generate_response::Event::Delta(pb::Delta {
                        text,
                        token_ids,
                    }))
                },
            )),
            "Finished" => {
                self.done = true;
                let read = deserialize::<(String, HashMap<String, OwnedVariant>)>(msg, &what)
                    .and_then(|(reason, map)| {
                        finished_from_signal(&reason, &Fields::from_map(&what, &map))
                    });
                Some(read.and_then(|(finished, id)| {
                    self.request_id = Some(id);
                    match finished {
                        Some(f) => Ok(event(pb::generate_response::Event::Finished(f))),
                        None => Err(ClientError::Rpc(Status::cancelled(format!(
                            "request {id} was cancelled"
                        )))),
                    }
                }))
            }
            "Failed" => {
                self.done = true;
                Some(
                    deserialize::<(String, String)>(msg, &what).and_then(|(name, message)| {
                        Err(ClientError::Rpc(status_from_error_name(&name, &message)))
                    }),
                )
            }
            _ => None,
        }
    }

    /// Whether a NameOwnerChanged signal says that gemmad left the bus.
    fn daemon_left(&self, msg: &Message) -> bool {
        let Ok((name, old, new)) = msg.body().deserialize::<(String, String, String)>() else {
            return false;
        };
        name == BUS_NAME
            && match &self.daemon {
                Some(d) => old == d.as_str(),
                None => new.is_empty(),
            }
    }

    fn stream_error(&self, e: Option<zbus::Error>) -> ClientError {
        ClientError::Bus {
            bus: self.bus.to_string(),
            reason: match e {
                Some(e) => format!("the connection failed during the generation: {e}"),
                None => "the connection closed during the generation".into(),
            },
        }
    }
}

fn event(e: pb::generate_response::Event) -> pb::GenerateResponse {
    pb::GenerateResponse { event: Some(e) }
}

impl Stream for DbusGeneration {
    type Item = Result<pb::GenerateResponse, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        while let Some(msg) = this.early.pop_front() {
            if let Some(item) = this.event(&msg) {
                return Poll::Ready(Some(item));
            }
        }
        // The request's own signals first: a Finished sent just before gemmad exits is queued
        // ahead of the NameOwnerChanged that follows it.
        loop {
            match Pin::new(&mut this.signals).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    if let Some(item) = this.event(&msg) {
                        return Poll::Ready(Some(item));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let err = this.stream_error(Some(e));
                    return this.finish(Err(err));
                }
                Poll::Ready(None) => {
                    let err = this.stream_error(None);
                    return this.finish(Err(err));
                }
                Poll::Pending => break,
            }
        }
        loop {
            match Pin::new(&mut this.owner).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    if this.daemon_left(&msg) {
                        let err = ClientError::Rpc(Status::unavailable(format!(
                            "gemmad left the {} before the generation finished (it stopped \
                             or crashed; its log says why)",
                            this.bus
                        )));
                        return this.finish(Err(err));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let err = this.stream_error(Some(e));
                    return this.finish(Err(err));
                }
                Poll::Ready(None) => {
                    let err = this.stream_error(None);
                    return this.finish(Err(err));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for DbusGeneration {
    /// gemmad cancels a request when its caller leaves the bus; a caller that stays and drops
    /// the stream cancels it here, when a Tokio runtime is there to send the call.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (conn, path, dest) = (self.conn.clone(), self.path.clone(), self.destination());
        rt.spawn(async move {
            let _ = conn
                .call_method(
                    Some(dest),
                    path.as_ref(),
                    Some(REQUEST_INTERFACE),
                    "Cancel",
                    &(),
                )
                .await;
        });
    }
}
