//! Reading the spool: envelopes and message octets (only of messages that are
//! durable), listings and the gauges' counts.

use super::*;

impl Spool {
    pub fn envelope(&self, id: QueueId) -> Result<Option<Envelope>> {
        if !self.visible(id) {
            return Ok(None);
        }
        self.tree
            .get(key(b'e', id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The envelope of `id` and its octets as queued, if the whole message is
    /// there to deliver: the body is read once, here, for the delivery. An
    /// envelope without its octets (a "zombie" an older version's stale write
    /// could make), or with a body missing or damaged, can never be delivered:
    /// it is removed, durably, and None returned. An I/O error reading the body
    /// is an error (nothing is removed).
    pub async fn deliverable(&self, id: QueueId) -> Result<Option<(Envelope, Vec<u8>)>> {
        let Some(env) = self.envelope(id)? else {
            return Ok(None);
        };
        if let Some(v) = self.tree.get(key(b'b', id))? {
            return Ok(Some((env, v.to_vec())));
        }
        match self.segment_body(id)? {
            Some(Some(body)) => return Ok(Some((env, body))),
            Some(None) => {
                self.remove(id).await?;
                return Ok(None);
            }
            None => {}
        }
        match self.body_len(id)? {
            Some(len) => match self.bodies.read(id)? {
                Some(v) if v.len() as u64 == len => return Ok(Some((env, v))),
                _ => tracing::error!(%id, len, file = %self.bodies_file(id),
                    "queue: removed a message whose body file is missing or damaged (never acknowledged, or a damaged store)"),
            },
            None => tracing::warn!(%id,
                "queue: removed an envelope without message octets (never acknowledged: left by a crash, or by an older version)"),
        }
        self.remove(id).await?;
        Ok(None)
    }

    /// The length of the body of `id` if it is in a file.
    fn body_len(&self, id: QueueId) -> Result<Option<u64>> {
        let Some(v) = self.tree.get(key(b'f', id))? else {
            return Ok(None);
        };
        let len =
            <[u8; 8]>::try_from(&v[..]).map_err(|_| anyhow!("{id}: damaged body length record"))?;
        Ok(Some(u64::from_be_bytes(len)))
    }

    fn bodies_file(&self, id: QueueId) -> String {
        format!("bodies/{id}")
    }

    /// The octets of `id` as queued, from sled or from its body file (None, and
    /// an error logged, if that file is missing or not whole).
    pub fn message(&self, id: QueueId) -> Result<Option<Vec<u8>>> {
        if !self.visible(id) {
            return Ok(None);
        }
        if let Some(v) = self.tree.get(key(b'b', id))? {
            return Ok(Some(v.to_vec()));
        }
        if let Some(body) = self.segment_body(id)? {
            return Ok(body);
        }
        let Some(len) = self.body_len(id)? else {
            return Ok(None);
        };
        match self.bodies.read(id)? {
            Some(v) if v.len() as u64 == len => Ok(Some(v)),
            _ => {
                tracing::error!(%id, len, file = %self.bodies_file(id),
                    "queue: the message's body file is missing or damaged");
                Ok(None)
            }
        }
    }

    /// The id of every message written to the queue, settled or not (the HA
    /// shadow's reconciliation: a message being accepted is included).
    pub fn ids(&self) -> Result<Vec<QueueId>> {
        let mut ids = Vec::new();
        for k in self.tree.scan_prefix(b"e\0").keys() {
            if let Ok(b) = <[u8; 8]>::try_from(&k?[2..]) {
                ids.push(QueueId::from_bytes(b));
            }
        }
        Ok(ids)
    }

    /// Every envelope, oldest first.
    pub fn envelopes(&self) -> Result<Vec<Envelope>> {
        let unsettled = self.unsettled().clone();
        let mut all = Vec::new();
        for r in self.tree.scan_prefix(b"e\0") {
            let env = decode(&r?.1)?;
            if !unsettled.contains(&env.id) {
                all.push(env);
            }
        }
        Ok(all)
    }

    /// Every envelope, oldest first, decoded one at a time as the caller goes
    /// (a page of a long queue decodes only what it shows).
    pub fn scan(&self) -> impl Iterator<Item = Result<Envelope>> + '_ {
        self.scan_after(None)
    }

    /// The envelopes after `after` (all: None), oldest first, read one at a time
    /// as the caller goes (a page of `queue list` reads no more than it shows).
    pub fn scan_after(
        &self,
        after: Option<QueueId>,
    ) -> impl Iterator<Item = Result<Envelope>> + '_ {
        let start = match after {
            Some(id) => {
                let mut k = key(b'e', id).to_vec();
                k.push(0); // just past `id`
                k
            }
            None => b"e\0".to_vec(),
        };
        let unsettled = self.unsettled().clone();
        self.tree
            .range(start..)
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(b"e\0")))
            .filter_map(move |r| match r {
                Err(e) => Some(Err(e.into())),
                Ok((_, v)) => match decode(&v) {
                    Ok(env) if unsettled.contains(&env.id) => None,
                    other => Some(other),
                },
            })
    }

    /// The oldest message in the queue (ids sort by arrival).
    pub fn oldest(&self) -> Result<Option<QueueId>> {
        match self.tree.scan_prefix(b"e\0").next() {
            Some(r) => Ok(Some(decode(&r?.1)?.id)),
            None => Ok(None),
        }
    }

    /// How many messages are stored (a message whose flush is in progress may be
    /// counted: for gauges, not decisions; so may [`Spool::oldest`]).
    pub fn len(&self) -> usize {
        self.tree.scan_prefix(b"e\0").count()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.scan_prefix(b"e\0").next().is_none()
    }
}
