//! Group commit one level above the database: requests that arrive while a batch is being committed queue up,
//! and the next batch takes up to `max` of them at once.
//!
//! One worker task per combiner runs the batches one after another. It waits for the first request and then
//! takes whatever else is already queued (never waiting for more), so an idle service commits a lone request at
//! once, and under load a batch grows to what arrived during the previous one. Each batch runs in a task of its
//! own: a panic in it drops that batch's reply channels (its requests answer an error) and the worker goes on.

use std::future::Future;

use tokio::sync::mpsc;

/// Hands jobs to the worker; dropping the last clone ends the worker once the queue is empty.
#[derive(Debug)]
pub struct Combiner<J> {
    queue: mpsc::UnboundedSender<J>,
}

impl<J> Clone for Combiner<J> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone() }
    }
}

impl<J: Send + 'static> Combiner<J> {
    /// Starts the worker on the current tokio runtime; `run` commits one batch (1..=`max` jobs, in arrival order).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let max = max.max(1);
        let (queue, mut jobs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while jobs.recv_many(&mut batch, max).await > 0 {
                let size = batch.len();
                if let Err(e) = tokio::spawn(run(std::mem::replace(&mut batch, Vec::with_capacity(max)))).await {
                    tracing::error!(size, error = %e, "a batch failed without answering");
                }
            }
        });
        Self { queue }
    }

    /// Queues a job; gives it back when the worker has stopped (the runtime is shutting down).
    ///
    /// # Errors
    /// The job itself, when nothing will run it.
    pub fn submit(&self, job: J) -> Result<(), J> {
        self.queue.send(job).map_err(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::{Barrier, oneshot};

    use super::*;

    type Job = (u32, oneshot::Sender<usize>);
    /// The batches a combiner ran, as the numbers of their jobs.
    type Seen = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A combiner whose batches take `hold` and record their sizes; each job is answered with its batch's size.
    fn recording(max: usize, hold: Duration) -> (Combiner<Job>, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let combiner = Combiner::spawn(max, move |batch: Vec<Job>| {
            let sink = sink.clone();
            async move {
                tokio::time::sleep(hold).await;
                sink.lock().unwrap().push(batch.iter().map(|(n, _)| *n).collect());
                let size = batch.len();
                for (_, reply) in batch {
                    let _ = reply.send(size);
                }
            }
        });
        (combiner, seen)
    }

    async fn ask(combiner: &Combiner<Job>, n: u32) -> usize {
        let (reply, answer) = oneshot::channel();
        combiner.submit((n, reply)).unwrap();
        answer.await.unwrap()
    }

    #[tokio::test]
    async fn a_lone_job_runs_at_once_in_a_batch_of_one() {
        let (combiner, seen) = recording(128, Duration::ZERO);
        assert_eq!(ask(&combiner, 7).await, 1);
        assert_eq!(*seen.lock().unwrap(), vec![vec![7]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_arriving_during_a_batch_are_combined_in_arrival_order_up_to_the_maximum() {
        let (combiner, seen) = recording(16, Duration::from_millis(20));
        let barrier = Arc::new(Barrier::new(200));
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let (combiner, barrier) = (combiner.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    ask(&combiner, n).await
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap() <= 16);
        }
        let batches = seen.lock().unwrap().clone();
        let mut all: Vec<u32> = batches.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>(), "every job ran exactly once");
        assert!(batches.iter().all(|b| b.len() <= 16));
        assert!(batches.len() < 40, "200 jobs over 20 ms batches were combined: {} batches", batches.len());
    }

    #[tokio::test]
    async fn a_panicking_batch_answers_nothing_and_the_next_batch_still_runs() {
        let combiner = Combiner::spawn(4, |batch: Vec<Job>| async move {
            if batch.iter().any(|(n, _)| *n == 13) {
                panic!("unlucky batch");
            }
            for (_, reply) in batch {
                let _ = reply.send(1);
            }
        });
        let (reply, answer) = oneshot::channel();
        combiner.submit((13, reply)).unwrap();
        assert!(answer.await.is_err(), "the panicking batch dropped its reply");
        assert_eq!(ask(&combiner, 1).await, 1);
    }
}
