//! Gossipsub with connection handlers that are woken when messages wait for them.
//!
//! gossipsub 0.50 queues what it sends to a peer in one queue shared by the handlers of all
//! that peer's connections. A handler opens its outbound stream only when it is polled and
//! finds the queue non-empty, and it asks to be woken by the queue only once that stream is
//! open. A peer's second connection usually finds the queue empty (the first handler drained
//! it), so it never opens a stream and never asks to be woken. When the first connection then
//! closes (a direct connection replacing one through a relay, say), every message for that
//! peer waits until something else polls the connection: none arrives.
//!
//! [`Woken`] wraps gossipsub and its handlers. Each handler registers a waker of its own on
//! every poll and says when its outbound stream is open; the handlers that have none yet are
//! woken after every call that may queue something (a poll of the behaviour, which runs the
//! heartbeat and answers peers, [`Woken::publish`] and
//! [`Woken::report_message_validation_result`], which forwards), so they find what waits and
//! open their stream. Once it is open, gossipsub wakes them itself: the cost of a wake-up is
//! the number of handlers still without a stream, which is small (a connection whose peer
//! was never sent anything).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::gossipsub::{self, MessageId, PublishError};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, gossipsub::Hasher, gossipsub::Topic};

type Inner = THandler<gossipsub::Behaviour>;

/// [`gossipsub::Behaviour`] whose handlers are woken when messages may wait for them (see the
/// module's text). Reads and configuration go to gossipsub through `Deref`.
pub struct Woken {
    inner: gossipsub::Behaviour,
    /// The handlers with no outbound stream yet (dropped from here once they have one).
    unstreamed: HashMap<ConnectionId, Arc<Nudge>>,
}

/// What a handler shares with the behaviour: its waker, and whether its outbound stream is
/// open.
#[derive(Debug, Default)]
struct Nudge {
    waker: AtomicWaker,
    streamed: AtomicBool,
}

impl Woken {
    /// Wraps a configured gossipsub.
    pub fn new(inner: gossipsub::Behaviour) -> Self {
        Self { inner, unstreamed: HashMap::new() }
    }

    /// [`gossipsub::Behaviour::publish`], then wakes the handlers that may have missed it.
    pub fn publish<H: Hasher>(
        &mut self,
        topic: Topic<H>,
        data: impl Into<Vec<u8>>,
    ) -> Result<MessageId, PublishError> {
        let r = self.inner.publish(topic, data);
        self.wake();
        r
    }

    /// [`gossipsub::Behaviour::report_message_validation_result`] (which forwards what is
    /// accepted), then wakes the handlers that may have missed it.
    pub fn report_message_validation_result(
        &mut self,
        id: &MessageId,
        source: &PeerId,
        acceptance: gossipsub::MessageAcceptance,
    ) {
        self.inner.report_message_validation_result(id, source, acceptance);
        self.wake();
    }

    /// Wakes the handlers that have no outbound stream yet.
    fn wake(&mut self) {
        self.unstreamed.retain(|_, n| {
            // Streamed, or its handler is gone (a connection closed or denied).
            if n.streamed.load(Ordering::Acquire) || Arc::strong_count(n) == 1 {
                return false;
            }
            n.waker.wake();
            true
        });
    }

    fn handler(&mut self, connection: ConnectionId, inner: Inner) -> Handler {
        let nudge = Arc::new(Nudge::default());
        self.unstreamed.insert(connection, nudge.clone());
        Handler { inner, nudge }
    }
}

impl std::fmt::Debug for Woken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Woken").field("unstreamed", &self.unstreamed.len()).finish_non_exhaustive()
    }
}

impl Deref for Woken {
    type Target = gossipsub::Behaviour;
    fn deref(&self) -> &gossipsub::Behaviour {
        &self.inner
    }
}

impl DerefMut for Woken {
    /// What is queued through this (a subscription, say) reaches the handlers at the next poll
    /// of the behaviour.
    fn deref_mut(&mut self) -> &mut gossipsub::Behaviour {
        &mut self.inner
    }
}

impl NetworkBehaviour for Woken {
    type ConnectionHandler = Handler;
    type ToSwarm = gossipsub::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(connection, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<Handler, ConnectionDenied> {
        let inner =
            self.inner.handle_established_inbound_connection(connection, peer, local, remote)?;
        Ok(self.handler(connection, inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(connection, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<Handler, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_outbound_connection(connection, peer, addr, role, port_use)?;
        Ok(self.handler(connection, inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        if let FromSwarm::ConnectionClosed(e) = &event {
            self.unstreamed.remove(&e.connection_id);
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, connection, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<gossipsub::Event, THandlerInEvent<Self>>> {
        let r = self.inner.poll(cx);
        self.wake();
        r
    }
}

/// Gossipsub's handler, with a waker the behaviour can use.
pub struct Handler {
    inner: Inner,
    nudge: Arc<Nudge>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").finish_non_exhaustive()
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = <Inner as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <Inner as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = <Inner as ConnectionHandler>::InboundProtocol;
    type OutboundProtocol = <Inner as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = <Inner as ConnectionHandler>::InboundOpenInfo;
    type OutboundOpenInfo = <Inner as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.nudge.waker.register(cx.waker());
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            '_,
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match &event {
            // gossipsub's one outbound stream: from now on its queue wakes the handler.
            ConnectionEvent::FullyNegotiatedOutbound(_) => {
                self.nudge.streamed.store(true, Ordering::Release);
            }
            ConnectionEvent::DialUpgradeError(_) => {
                self.nudge.streamed.store(false, Ordering::Release);
            }
            _ => {}
        }
        self.inner.on_connection_event(event);
    }
}
