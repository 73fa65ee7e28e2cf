//! Reading a message's octets: DATA (decoded as it arrives) and BDAT chunks
//! (their size known first), each reserved in the data budget
//! (`smtp.max_data_in_flight`) before it is read, then accepted.

use super::*;

/// The budget for message data is spent: 452 4.3.1, counted.
pub(super) fn over_budget(peer: SocketAddr) -> Reply {
    crate::metrics::METRICS.smtp_data_refused.inc();
    let r = limits::refusal();
    tracing::info!(%peer, reply = %r, "message data refused: smtp.max_data_in_flight spent");
    r
}

/// DATA: reserves memory for the message as it arrives, then queues it.
pub(super) async fn read_data<S: AsyncRead + AsyncWrite + Unpin>(
    service: &Service,
    session: &mut Session,
    conn: &mut Conn<S>,
    peer: SocketAddr,
    tx: &Tx,
    go_ahead: Reply,
) -> io::Result<Reply> {
    let cfg = &service.config;
    // No room for even a small message: refused before the data (the
    // transaction stays; the client may try DATA again or give up).
    let Some(held) = service.budget.reserve() else {
        return Ok(over_budget(peer));
    };
    conn.reply(&go_ahead);
    let mut held = Some(held);
    let mut body = Vec::new();
    let read = conn.read_data(
        session.data_decoder(),
        cfg.data_timeout,
        &mut body,
        &mut held,
    );
    let decoder = within(tx.deadline, read).await?;
    if held.is_none() {
        session.abort_transaction();
        return Ok(over_budget(peer));
    }
    let r = match session.data_received(body, decoder.over_size()) {
        Ok(m) => accept(service, m, peer).await,
        Err(r) => {
            log_refused(peer, &r);
            r
        }
    };
    drop(held);
    Ok(r)
}

/// A BDAT command as the session left it to the driver.
pub(super) struct Chunk {
    pub(super) size: u64,
    pub(super) last: bool,
    /// Discard the octets and send this.
    pub(super) refuse: Option<Reply>,
}

/// BDAT: reserves memory for the chunk before reading it (its size is known),
/// then hands it to the session; the last one is queued.
pub(super) async fn read_bdat<S: AsyncRead + AsyncWrite + Unpin>(
    service: &Service,
    session: &mut Session,
    conn: &mut Conn<S>,
    peer: SocketAddr,
    tx: &mut Tx,
    chunk: Chunk,
) -> io::Result<Reply> {
    let Chunk { size, last, refuse } = chunk;
    let refuse = refuse.or_else(|| {
        let mut held = tx.bdat.take().or_else(|| service.budget.reserve());
        let total = tx.bdat_octets.saturating_add(size);
        if held.as_mut().is_some_and(|h| h.ensure(total)) {
            tx.bdat = held;
            None
        } else {
            session.abort_transaction();
            Some(over_budget(peer))
        }
    });
    let mut octets = Vec::new();
    if refuse.is_none() {
        // Within max_message_size: the session refused anything bigger.
        octets.reserve_exact(size as usize);
    }
    let sink = refuse.is_none().then_some(&mut octets);
    within(
        tx.deadline,
        conn.read_exact(size, service.config.data_timeout, sink),
    )
    .await?;
    if let Some(r) = refuse {
        return Ok(r);
    }
    tx.bdat_octets += size;
    Ok(match session.bdat_chunk(octets, last) {
        Ok(None) => Session::chunk_reply(size),
        // Normalizing bare line endings may have grown the body past what its
        // chunks reserved: the budget covers what is held until the 250.
        Ok(Some(m))
            if !tx
                .bdat
                .as_mut()
                .is_some_and(|h| h.ensure(m.body.len() as u64)) =>
        {
            over_budget(peer)
        }
        Ok(Some(m)) => accept(service, m, peer).await,
        Err(r) => r,
    })
}
