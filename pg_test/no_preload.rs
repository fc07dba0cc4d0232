//! pgwatch without `shared_preload_libraries`: its own server. Delivery is inline whatever
//! `pgwatch.delivery` says, payloads carry no `seq`, there are no workers, and stats count per backend.

// Shared with the main suite, which uses all of it.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use support::{seq_of, serial, stat, watched, WAIT};

const CONF: &[&str] = &[];

#[test]
fn without_preloading_delivery_is_inline() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE plain (id int PRIMARY KEY, role_id int); SELECT watch_table('plain', '*', '{role_id}')",
        &["public.plain"],
    );
    writer.batch_execute("INSERT INTO plain VALUES (1, 2)").unwrap();
    writer.batch_execute("UPDATE plain SET role_id = 3").unwrap();
    let got = listener.receive_raw(2, WAIT);
    listener.expect_silence();
    let payloads: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        payloads,
        [
            r#"{"tbl":"public.plain","op":"insert","rows":[{"id":1,"role_id":2}]}"#,
            r#"{"tbl":"public.plain","op":"update","rows":[{"id":1,"role_id":3,"old":{"role_id":2}}]}"#
        ]
    );
    assert!(payloads.iter().all(|p| seq_of(p).is_none()));
    let workers: i64 = writer.query_one("SELECT count(*) FROM pgwatch.workers", &[]).unwrap().get(0);
    assert_eq!(workers, 0);
    // Counters are this backend's own: the listener's session captured nothing.
    assert_eq!(stat(&mut writer, "rows_captured"), 2);
    assert_eq!(stat(&mut listener.client, "rows_captured"), 0);
}
