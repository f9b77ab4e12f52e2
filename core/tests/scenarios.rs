//! The reference scenarios: Alice and Bob share a todo list.

mod common;

use common::*;
use confluo_core::Value;

fn todo_row(id: &str, title: &str, status: &str) -> Vec<Value> {
    vec![text(id), text(title), text(status)]
}

#[test]
fn a_edits_to_different_columns_both_survive() {
    let clock = clock();
    let (alice, bob) = (todo_replica(&clock), todo_replica(&clock));
    alice
        .execute(
            "INSERT INTO todo VALUES ('t1', 'Buy groceries', 'in_progress')",
            &[],
        )
        .unwrap();
    pull(&bob, &alice);
    assert_eq!(
        dump(&bob, "todo"),
        vec![todo_row("t1", "Buy groceries", "in_progress")]
    );

    clock.advance(1000);
    alice
        .execute("UPDATE todo SET status = 'done' WHERE id = 't1'", &[])
        .unwrap();
    clock.advance(1000);
    bob.execute(
        "UPDATE todo SET title = 'Buy groceries and milk' WHERE id = 't1'",
        &[],
    )
    .unwrap();
    exchange(&alice, &bob);
    let expected = vec![todo_row("t1", "Buy groceries and milk", "done")];
    assert_eq!(dump(&alice, "todo"), expected);
    assert_eq!(dump(&bob, "todo"), expected);
}

#[test]
fn b_same_column_the_later_write_wins_on_both() {
    let clock = clock();
    let (alice, bob) = (todo_replica(&clock), todo_replica(&clock));
    alice
        .execute("INSERT INTO todo VALUES ('t1', 'Call mom', 'open')", &[])
        .unwrap();
    pull(&bob, &alice);
    clock.advance(1000);
    bob.execute("UPDATE todo SET title = 'Call dad' WHERE id = 't1'", &[])
        .unwrap();
    clock.advance(1000);
    alice
        .execute(
            "UPDATE todo SET title = 'Call mom and dad' WHERE id = 't1'",
            &[],
        )
        .unwrap();
    // Exchange in the order that would favour the earlier write if merge
    // were "last applied wins".
    exchange(&bob, &alice);
    for db in [&alice, &bob] {
        assert_eq!(
            dump(db, "todo"),
            vec![todo_row("t1", "Call mom and dad", "open")]
        );
    }
}

#[test]
fn c_a_delete_beats_a_concurrent_edit() {
    let clock = clock();
    let (alice, bob) = (todo_replica(&clock), todo_replica(&clock));
    alice
        .execute(
            "INSERT INTO todo VALUES ('t1', 'Water plants', 'open')",
            &[],
        )
        .unwrap();
    pull(&bob, &alice);
    clock.advance(1000);
    alice
        .execute("DELETE FROM todo WHERE id = 't1'", &[])
        .unwrap();
    clock.advance(1000);
    // Bob's edit is later in time, and still loses to the delete.
    bob.execute("UPDATE todo SET status = 'done' WHERE id = 't1'", &[])
        .unwrap();
    exchange(&alice, &bob);
    assert!(dump(&alice, "todo").is_empty());
    assert!(dump(&bob, "todo").is_empty());
}

#[test]
fn d_a_reinsert_after_the_delete_was_seen_brings_the_row_back() {
    let clock = clock();
    let (alice, bob) = (todo_replica(&clock), todo_replica(&clock));
    alice
        .execute(
            "INSERT INTO todo VALUES ('t1', 'Water plants', 'open')",
            &[],
        )
        .unwrap();
    pull(&bob, &alice);
    alice
        .execute("DELETE FROM todo WHERE id = 't1'", &[])
        .unwrap();
    pull(&bob, &alice);
    assert!(dump(&bob, "todo").is_empty());
    clock.advance(1000);
    bob.execute(
        "INSERT INTO todo VALUES ('t1', 'Water plants again', 'open')",
        &[],
    )
    .unwrap();
    exchange(&alice, &bob);
    for db in [&alice, &bob] {
        assert_eq!(
            dump(db, "todo"),
            vec![todo_row("t1", "Water plants again", "open")]
        );
    }
}

#[test]
fn e_a_thousand_offline_edits_each_converge_in_one_exchange() {
    let clock = clock();
    let (alice, bob) = (todo_replica(&clock), todo_replica(&clock));
    alice
        .write(|tx| {
            for i in 0..200 {
                tx.execute(
                    "INSERT INTO todo VALUES (?1, ?2, 'open')",
                    &[format!("t{i:03}").into(), format!("task {i}").into()],
                )?;
            }
            Ok(())
        })
        .unwrap();
    pull(&bob, &alice);
    for i in 0..1000 {
        clock.advance(1);
        let id = format!("t{:03}", i % 200);
        alice
            .execute(
                "UPDATE todo SET title = ?1 WHERE id = ?2",
                &[format!("alice {i}").into(), id.clone().into()],
            )
            .unwrap();
        let id_b = format!("t{:03}", (i * 7) % 200);
        bob.execute(
            "UPDATE todo SET status = ?1 WHERE id = ?2",
            &[format!("bob {i}").into(), id_b.into()],
        )
        .unwrap();
        if i % 100 == 0 {
            bob.execute(
                "DELETE FROM todo WHERE id = ?1",
                &[format!("t{:03}", 199 - i / 100).into()],
            )
            .unwrap();
        }
    }
    exchange(&alice, &bob);
    let a = dump(&alice, "todo");
    assert_eq!(a, dump(&bob, "todo"));
    assert_eq!(a.len(), 190);
    // Alice's last title for t000 and Bob's last status for it both survive.
    assert_eq!(a[0][1], text("alice 800"));
    assert_eq!(a[0][2], text("bob 800"));
}

#[test]
fn exchanges_are_idempotent_and_never_echo() {
    let clock = clock();
    let (alice, bob) = (todo_replica(&clock), todo_replica(&clock));
    alice
        .execute("INSERT INTO todo VALUES ('t1', 'x', 'open')", &[])
        .unwrap();
    let first = pull(&bob, &alice);
    assert_eq!(first.applied, 3);
    // Nothing new: Alice sends nothing; Bob has nothing of Alice's to return.
    assert_eq!(pull(&bob, &alice).received, 0);
    assert_eq!(pull(&alice, &bob).received, 0);
    // Re-applying an old set changes nothing.
    let again = bob.apply(&alice.changes_since(0, None).unwrap()).unwrap();
    assert_eq!((again.applied, again.stale), (0, 3));
}
