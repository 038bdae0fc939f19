//! Group commit one level above the database, per key: requests for one key (an option, a group of users) queue
//! in that key's lane, and each batch takes up to `max_batch` of them at once; lanes of different keys run side
//! by side, so a hot option's batches never hold up another option's orders.
//!
//! A lane exists only while it has work: the first request for an idle key creates it and spawns its worker,
//! which takes whatever is queued (never waiting for more), so a lone request is committed at once and under
//! load a batch grows to what arrived during the previous one; the worker removes the lane and ends when its
//! queue is empty. A lane's queue is bounded: a request past `queue_max` is handed back at once, for the caller
//! to shed (503), rather than queued behind minutes of work. Each batch runs in a task of its own: a panic in it
//! drops that batch's jobs (their reply channels close, so their callers answer an error) and the lane goes on.
//!
//! Workers run on the runtime that created the lanes, not on the one of the request that woke the lane: an HTTP
//! server's worker thread that stops first at a graceful shutdown (its own connections answered) would otherwise
//! drop a lane that other workers' requests still wait in.
//!
//! A lane may pipeline: with `depth` 2, a batch that [hands off](Handoff::hand_off) (an order batch once it is
//! validated) lets the next batch start beside it, as hot-row engines alternate two groups, so that one batch's
//! reads and writes overlap the other's commit. Never more than `depth` batches of a lane run at once, and a
//! batch that does not hand off holds the lane until it ends (what `depth` 1 does for every batch).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Run<J> = dyn Fn(Vec<J>, Handoff) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// Given to every batch: handing it off lets the lane start its next batch while this one goes on (within the
/// lane's `depth`). A batch that ends without handing off hands off then.
#[derive(Debug)]
pub struct Handoff(Option<oneshot::Sender<()>>);

impl Handoff {
    /// Lets the lane start its next batch now; later calls do nothing.
    pub fn hand_off(&mut self) {
        if let Some(next) = self.0.take() {
            let _ = next.send(());
        }
    }
}

/// The lanes of one kind of job; cloning shares them.
pub struct Lanes<K, J> {
    inner: Arc<Inner<K, J>>,
}

struct Inner<K, J> {
    /// The queue of every lane that has a worker; a key is absent exactly when its lane is idle.
    lanes: Mutex<HashMap<K, VecDeque<J>>>,
    max_batch: usize,
    queue_max: usize,
    /// Batches of one lane that may run at once.
    depth: usize,
    run: Box<Run<J>>,
    /// Where the lanes' workers run: the runtime the lanes were created on, when there was one.
    runtime: Option<tokio::runtime::Handle>,
}

impl<K, J> Clone for Lanes<K, J> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<K, J> fmt::Debug for Lanes<K, J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lanes")
            .field("max_batch", &self.inner.max_batch)
            .field("queue_max", &self.inner.queue_max)
            .field("depth", &self.inner.depth)
            .finish_non_exhaustive()
    }
}

/// The job a full lane handed back.
#[derive(Debug)]
pub struct Full<J>(pub J);

impl<K, J> Lanes<K, J>
where
    K: Eq + Hash + Clone + Send + 'static,
    J: Send + 'static,
{
    /// `run` commits one batch (1..=`max_batch` jobs of one lane, in arrival order); each lane queues at most
    /// `queue_max` jobs besides the batches it is running, and runs at most `depth` batches at once (see
    /// [`Handoff`]).
    pub fn new<F, Fut>(max_batch: usize, queue_max: usize, depth: usize, run: F) -> Self
    where
        F: Fn(Vec<J>, Handoff) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let run: Box<Run<J>> = Box::new(move |batch, handoff| Box::pin(run(batch, handoff)));
        Self {
            inner: Arc::new(Inner {
                lanes: Mutex::new(HashMap::new()),
                max_batch: max_batch.max(1),
                queue_max: queue_max.max(1),
                depth: depth.max(1),
                run,
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Queues `job` in `key`'s lane, starting the lane's worker when the lane was idle.
    ///
    /// # Errors
    /// [`Full`] with the job when the lane already queues `queue_max` jobs.
    ///
    /// # Panics
    /// When the lanes were created outside a tokio runtime and this is called outside one too.
    pub fn submit(&self, key: K, job: J) -> Result<(), Full<J>> {
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        match lanes.get_mut(&key) {
            Some(queue) if queue.len() >= self.inner.queue_max => return Err(Full(job)),
            Some(queue) => queue.push_back(job),
            None => {
                lanes.insert(key.clone(), VecDeque::from([job]));
                let worker = drive(self.inner.clone(), key);
                match &self.inner.runtime {
                    Some(runtime) => drop(runtime.spawn(worker)),
                    None => drop(tokio::spawn(worker)),
                }
            }
        }
        Ok(())
    }

    /// How many lanes are running now: for tests and metrics.
    #[must_use]
    pub fn active(&self) -> usize {
        self.inner.lanes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// How many jobs wait in all lanes now (not counting the batches being committed).
    #[must_use]
    pub fn queued(&self) -> usize {
        self.inner.lanes.lock().unwrap_or_else(PoisonError::into_inner).values().map(VecDeque::len).sum()
    }
}

/// A lane's worker: batches until its queue is empty and its batches have ended, then removes the lane (under the
/// same lock a submit takes, so a job is either in a batch this worker will run or finds the lane gone and starts a
/// new worker). The next batch starts once the newest one has handed off and fewer than `depth` run.
async fn drive<K, J>(inner: Arc<Inner<K, J>>, key: K)
where
    K: Eq + Hash + Send + 'static,
    J: Send + 'static,
{
    let mut running: VecDeque<(usize, JoinHandle<()>)> = VecDeque::new();
    // The newest batch's hand-off, until it comes (or the batch ends without it).
    let mut newest: Option<oneshot::Receiver<()>> = None;
    loop {
        while newest.is_some() || running.len() >= inner.depth {
            match newest.as_mut() {
                Some(handed) if running.len() < inner.depth => {
                    let _ = handed.await;
                    newest = None;
                }
                _ => ended(&mut running).await,
            }
        }
        let batch: Vec<J> = {
            let mut lanes = inner.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(queue) = lanes.get_mut(&key) else { return };
            if queue.is_empty() {
                if running.is_empty() {
                    lanes.remove(&key);
                    return;
                }
                Vec::new()
            } else {
                let take = queue.len().min(inner.max_batch);
                queue.drain(..take).collect()
            }
        };
        if batch.is_empty() {
            // Nothing queued while a batch still runs: the lane lives on until it ends.
            ended(&mut running).await;
            continue;
        }
        let (handoff, handed) = oneshot::channel();
        running.push_back((batch.len(), tokio::spawn((inner.run)(batch, Handoff(Some(handoff))))));
        newest = Some(handed);
    }
}

/// Waits for the oldest running batch to end.
async fn ended(running: &mut VecDeque<(usize, JoinHandle<()>)>) {
    if let Some((size, batch)) = running.pop_front()
        && let Err(e) = batch.await
    {
        tracing::error!(size, error = %e, "a batch failed without answering");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::{Barrier, Notify, oneshot};

    use super::*;

    type Job = (u32, oneshot::Sender<usize>);
    /// The batches a lane ran, as the numbers of their jobs.
    type Seen = Arc<Mutex<Vec<Vec<u32>>>>;

    /// Lanes whose batches wait for `gate` (when given) and record themselves; each job is answered with its
    /// batch's size.
    fn recording(max: usize, queue_max: usize, gate: Option<Arc<Notify>>) -> (Lanes<u32, Job>, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let lanes = Lanes::new(max, queue_max, 1, move |batch: Vec<Job>, _| {
            let (sink, gate) = (sink.clone(), gate.clone());
            async move {
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                sink.lock().unwrap().push(batch.iter().map(|(n, _)| *n).collect());
                let size = batch.len();
                for (_, reply) in batch {
                    let _ = reply.send(size);
                }
            }
        });
        (lanes, seen)
    }

    fn ask(lanes: &Lanes<u32, Job>, key: u32, n: u32) -> oneshot::Receiver<usize> {
        let (reply, answer) = oneshot::channel();
        lanes.submit(key, (n, reply)).unwrap();
        answer
    }

    /// Opens `gate` for one waiting batch every millisecond, until aborted.
    fn keep_opening(gate: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                gate.notify_one();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    /// Waits until `done` holds, polling: the lanes' workers run on other tasks.
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..2_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn a_lone_job_runs_at_once_in_a_batch_of_one_and_its_lane_is_dropped() {
        let (lanes, seen) = recording(128, 16, None);
        assert_eq!(ask(&lanes, 1, 7).await.unwrap(), 1);
        assert_eq!(*seen.lock().unwrap(), vec![vec![7]]);
        until("the idle lane is dropped", || lanes.active() == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_arriving_during_a_batch_are_combined_in_arrival_order_up_to_the_maximum() {
        let gate = Arc::new(Notify::new());
        let (lanes, seen) = recording(16, 1_000, Some(gate.clone()));
        // The first batch holds the lane until the gate opens; everything else queues behind it.
        let first = ask(&lanes, 1, 0);
        until("the first batch runs", || lanes.queued() == 0 && lanes.active() == 1).await;
        let rest: Vec<_> = (1..200).map(|n| ask(&lanes, 1, n)).collect();
        assert_eq!(lanes.queued(), 199);
        let opener = keep_opening(gate);
        assert_eq!(first.await.unwrap(), 1);
        for answer in rest {
            assert!(answer.await.unwrap() <= 16);
        }
        opener.abort();
        let batches = seen.lock().unwrap().clone();
        let all: Vec<u32> = batches.iter().flatten().copied().collect();
        assert_eq!(all, (0..200).collect::<Vec<_>>(), "every job ran once, in arrival order");
        assert_eq!(batches.len(), 1 + 199_usize.div_ceil(16), "the queue was taken 16 at a time");
    }

    /// What an HTTP server's worker thread does at a graceful shutdown: the runtime of the request that woke the
    /// lane stops while the lane still has work. The lane lives on the runtime that created it and answers all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_outlives_the_runtime_of_the_request_that_started_it() {
        let gate = Arc::new(Notify::new());
        let (lanes, seen) = recording(4, 1_000, Some(gate.clone()));
        let submitter = lanes.clone();
        let answers = std::thread::spawn(move || {
            let worker = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let answers: Vec<_> = worker.block_on(async { (0..10).map(|n| ask(&submitter, 1, n)).collect() });
            worker.shutdown_timeout(Duration::ZERO);
            answers
        })
        .join()
        .unwrap();
        // The lane's worker may have taken its first batch before the other thread queued every job, so that
        // batch holds 1 to 4 of them: it has been taken once fewer than all 10 wait.
        until("the first batch waits at the gate", || lanes.queued() < 10).await;
        let opener = keep_opening(gate);
        for answer in answers {
            assert!(answer.await.is_ok(), "a job was dropped with the runtime that queued it");
        }
        opener.abort();
        let all: Vec<u32> = seen.lock().unwrap().iter().flatten().copied().collect();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_lane_does_not_hold_up_another_key() {
        let gate = Arc::new(Notify::new());
        let opened = gate.clone();
        // Job 1's batch waits for the gate; every other batch answers at once.
        let lanes: Lanes<u32, Job> = Lanes::new(16, 16, 1, move |batch: Vec<Job>, _| {
            let gate = opened.clone();
            async move {
                if batch.iter().any(|(n, _)| *n == 1) {
                    gate.notified().await;
                }
                for (_, reply) in batch {
                    let _ = reply.send(1);
                }
            }
        });
        let mut hot = ask(&lanes, 1, 1);
        until("the hot batch runs", || lanes.active() == 1 && lanes.queued() == 0).await;
        let cold = ask(&lanes, 2, 2);
        let answered = tokio::time::timeout(Duration::from_secs(5), cold).await;
        assert_eq!(answered.unwrap().unwrap(), 1, "the cold lane answered while the hot one was blocked");
        assert!(hot.try_recv().is_err(), "the hot batch is still blocked");
        gate.notify_one();
        assert_eq!(hot.await.unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_lane_hands_the_job_back_and_other_lanes_still_take_jobs() {
        let gate = Arc::new(Notify::new());
        let (lanes, _) = recording(4, 3, Some(gate.clone()));
        let _running = ask(&lanes, 1, 0);
        until("the first batch runs", || lanes.queued() == 0 && lanes.active() == 1).await;
        let _queued: Vec<_> = (1..=3).map(|n| ask(&lanes, 1, n)).collect();
        let (reply, _answer) = oneshot::channel();
        let Err(Full((n, _))) = lanes.submit(1, (99, reply)) else { panic!("the fourth queued job is refused") };
        assert_eq!(n, 99);
        let _other = ask(&lanes, 2, 100);
        gate.notify_waiters();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_jobs_over_many_lanes_each_run_exactly_once() {
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        let lanes: Lanes<u32, oneshot::Sender<()>> =
            Lanes::new(8, 10_000, 2, move |batch: Vec<oneshot::Sender<()>>, mut handoff: Handoff| {
                let counter = counter.clone();
                async move {
                    handoff.hand_off();
                    counter.fetch_add(batch.len(), Ordering::SeqCst);
                    for reply in batch {
                        let _ = reply.send(());
                    }
                }
            });
        let barrier = Arc::new(Barrier::new(500));
        let tasks: Vec<_> = (0..500_u32)
            .map(|n| {
                let (lanes, barrier) = (lanes.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let (reply, answer) = oneshot::channel();
                    lanes.submit(n % 7, reply).unwrap();
                    answer.await.unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 500);
        until("every lane is dropped", || lanes.active() == 0).await;
    }

    /// Lanes of depth `depth` whose batches hand off at once (when `hand_off`), then wait for `gate`; `running`
    /// counts the batches between their start and their end, `most` the most seen at once.
    fn gated(depth: usize, hand_off: bool, gate: Arc<Notify>) -> (Lanes<u32, Job>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (now, peak) = (running.clone(), most.clone());
        let lanes = Lanes::new(4, 1_000, depth, move |batch: Vec<Job>, mut handoff: Handoff| {
            let (gate, now, peak) = (gate.clone(), now.clone(), peak.clone());
            async move {
                peak.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                if hand_off {
                    handoff.hand_off();
                }
                gate.notified().await;
                now.fetch_sub(1, Ordering::SeqCst);
                let size = batch.len();
                for (_, reply) in batch {
                    let _ = reply.send(size);
                }
            }
        });
        (lanes, running, most)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_that_hands_off_lets_the_next_start_beside_it_up_to_the_depth() {
        let gate = Arc::new(Notify::new());
        let (lanes, running, most) = gated(2, true, gate.clone());
        let answers: Vec<_> = (0..12).map(|n| ask(&lanes, 1, n)).collect();
        until("two batches run at once", || running.load(Ordering::SeqCst) == 2).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(running.load(Ordering::SeqCst), 2, "a third batch waits for one of the two to end");
        let opener = keep_opening(gate);
        for answer in answers {
            assert!(answer.await.unwrap() <= 4);
        }
        opener.abort();
        assert_eq!(most.load(Ordering::SeqCst), 2);
        until("the idle lane is dropped", || lanes.active() == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_hand_off_a_deep_lane_runs_one_batch_at_a_time() {
        let gate = Arc::new(Notify::new());
        let (lanes, running, most) = gated(2, false, gate.clone());
        let answers: Vec<_> = (0..12).map(|n| ask(&lanes, 1, n)).collect();
        until("the first batch runs", || running.load(Ordering::SeqCst) == 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(running.load(Ordering::SeqCst), 1);
        let opener = keep_opening(gate);
        for answer in answers {
            answer.await.unwrap();
        }
        opener.abort();
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_batch_answers_nothing_and_the_next_batch_still_runs() {
        let lanes: Lanes<u32, Job> = Lanes::new(4, 16, 1, |batch: Vec<Job>, _| async move {
            if batch.iter().any(|(n, _)| *n == 13) {
                panic!("unlucky batch");
            }
            for (_, reply) in batch {
                let _ = reply.send(1);
            }
        });
        assert!(ask(&lanes, 1, 13).await.is_err(), "the panicking batch dropped its reply");
        assert_eq!(ask(&lanes, 1, 1).await.unwrap(), 1);
    }
}
