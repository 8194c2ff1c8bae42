//! One LISTEN connection on `stageflow_events`, fanned out to every server-sent-events client and
//! to the webhook dispatcher through a broadcast channel. It reconnects when the connection drops.

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;

#[derive(Clone)]
pub struct Events {
    sender: broadcast::Sender<String>,
}

impl Events {
    pub fn start(database_url: String) -> Self {
        let (sender, _) = broadcast::channel(1024);
        let events = Events { sender: sender.clone() };
        tokio::spawn(async move {
            loop {
                let connected = match stageflow_client::tls::ConnectConfig::from_url(&database_url) {
                    Ok(settings) => settings.config.connect(settings.tls).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match connected {
                    Ok((client, mut connection)) => {
                        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        let listening = client.batch_execute("LISTEN stageflow_events");
                        tokio::pin!(listening);
                        // Drive the connection while LISTEN runs, then forward notifications.
                        let mut ready = false;
                        #[allow(clippy::never_loop)]
                        loop {
                            tokio::select! {
                                result = &mut listening, if !ready => {
                                    if result.is_err() { break; }
                                    ready = true;
                                }
                                message = messages.next() => match message {
                                    Some(Ok(AsyncMessage::Notification(n))) => { let _ = sender.send(n.payload().to_owned()); }
                                    Some(Ok(_)) => {}
                                    _ => break,
                                }
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "events: cannot connect"),
                }
                tokio::time::sleep(crate::RETRY).await;
            }
        });
        events
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.sender.subscribe()
    }
}
