//! Signatures per second on SoftHSM, in one run: through the signer `Handle` with 1 and 2
//! sessions (actor threads), next to raw cryptoki `C_SignInit`+`C_Sign` with `CKM_ECDSA`
//! on 1 thread and on 2 threads each with its own session. The gap is the agent's overhead
//! (queue, oneshot, host SHA-256, low-S normalization); the 1→2 step shows what parallel
//! sessions buy on this machine.
//!
//! Creates its own SoftHSM token with the test fixture and points `SOFTHSM2_CONF` at it
//! before anything loads the module. Run with `cargo bench --bench sign`.

#[allow(dead_code)]
#[path = "../tests/common/softhsm.rs"]
mod softhsm;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use tm_agent::signer::pkcs11;
use tm_agent::signer::{ActorOptions, Handle};

/// Concurrent clients through the `Handle` (signatures per measured iteration).
const BATCH: usize = 64;
const LABEL: &str = "bench-key";

fn handle(hsm: &softhsm::SoftHsm, sessions: usize) -> Handle {
    let mut settings = hsm.settings(Some(LABEL));
    settings.sessions = sessions;
    let (info, workers) = pkcs11::open(&settings, 0).expect("open the key");
    Handle::spawn(
        info,
        workers,
        ActorOptions {
            queue_depth: 4 * BATCH,
            name: format!("bench-{sessions}"),
            ..ActorOptions::default()
        },
    )
    .expect("spawn")
}

fn raw_sessions(hsm: &softhsm::SoftHsm, n: usize) -> (Vec<Session>, ObjectHandle) {
    let ctx = Pkcs11::new(softhsm::MODULE).expect("load");
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == hsm.label))
        .expect("token");
    let sessions: Vec<Session> = (0..n).map(|_| ctx.open_ro_session(slot).unwrap()).collect();
    match sessions[0].login(UserType::User, Some(&AuthPin::from(softhsm::USER_PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    let key = sessions[0]
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(LABEL.as_bytes().to_vec()),
        ])
        .unwrap()[0];
    (sessions, key)
}

fn main() {
    let hsm = softhsm::SoftHsm::new("bench");
    // Still single-threaded: nothing has loaded SoftHSM or started a thread yet.
    std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
    pkcs11::generate(&hsm.settings(None), LABEL, None).expect("generate the bench key");

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut group = c.benchmark_group("softhsm_p256_sign");
    for sessions in [1usize, 2] {
        let h = handle(&hsm, sessions);
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(format!("handle/{sessions}_sessions"), |b| {
            // BATCH clients, each with one request in flight at a time, `iters` requests
            // each: one measured iteration is BATCH signatures under steady load.
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut clients = tokio::task::JoinSet::new();
                    for i in 0..BATCH {
                        let h = h.clone();
                        clients.spawn(async move {
                            let message = format!("bench.{i}");
                            for _ in 0..iters {
                                h.sign(message.as_bytes()).await.unwrap();
                            }
                        });
                    }
                    while let Some(done) = clients.join_next().await {
                        done.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }

    let digest = tm_agent::jose::sha256(b"bench");
    let (sessions, key) = raw_sessions(&hsm, 2);
    let mut sessions = Some(sessions);
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_cryptoki/1_thread", |b| {
        let session = &sessions.as_ref().unwrap()[0];
        b.iter(|| session.sign(&Mechanism::Ecdsa, key, &digest).unwrap())
    });
    group.throughput(Throughput::Elements(2));
    group.bench_function("raw_cryptoki/2_threads", |b| {
        b.iter_custom(|iters| {
            let own = sessions.take().unwrap();
            let start = Instant::now();
            let back: Vec<Session> = std::thread::scope(|scope| {
                let threads: Vec<_> = own
                    .into_iter()
                    .map(|session| {
                        scope.spawn(move || {
                            for _ in 0..iters {
                                session.sign(&Mechanism::Ecdsa, key, &digest).unwrap();
                            }
                            session
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let elapsed = start.elapsed();
            sessions = Some(back);
            elapsed
        })
    });
    group.finish();
    c.final_summary();
}
