//! The shop migrations apply and roll back on SQLite and PostgreSQL, the entities read and
//! write the resulting tables, and the schema's constraints (CHECK, partial unique index,
//! foreign keys) are enforced on both backends.
//!
//! PostgreSQL is expected at `postgres://postgres@127.0.0.1:5432/postgres`; each run works in
//! a fresh database `shop_test_mig_<nanos>_<pid>` that is dropped afterwards. When it is
//! unreachable the PostgreSQL test is skipped, unless `CI` is set, where it fails.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use futures::FutureExt;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, ActiveValue::Set, ColumnTrait, ConnectOptions, ConnectionTrait, Database,
    DatabaseConnection, DbErr, EntityTrait, QueryFilter, SqlErr,
};
use shop_migrations::{Migrator, MigratorTrait};
use shop_persistence::entity::{cart, daily_popular_product, product, product_option, user};

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PG_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432";

async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options.max_connections(2).connect_timeout(Duration::from_secs(5)).sqlx_logging(false);
    Database::connect(options).await
}

/// A fixed instant with whole seconds, so it round-trips exactly through both backends.
fn at(hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, hour, 0, 0).single().expect("valid fixed timestamp")
}

async fn insert_user(db: &DatabaseConnection, name: &str, balance: i64) -> user::Model {
    user::ActiveModel {
        id: NotSet,
        name: Set(name.to_owned()),
        balance: Set(balance),
        version: Set(0),
        password_hash: Set(None),
        created_at: Set(at(9)),
        updated_at: Set(at(9)),
        deleted_at: Set(None),
    }
    .insert(db)
    .await
    .expect("insert user")
}

fn option_model(product_id: i64, stock: i64) -> product_option::ActiveModel {
    product_option::ActiveModel {
        id: NotSet,
        product_id: Set(product_id),
        name: Set("Large / Red".to_owned()),
        price: Set(12_000),
        stock: Set(stock),
        version: Set(0),
        fence_token: Set(0),
        created_at: Set(at(9)),
        updated_at: Set(at(9)),
        deleted_at: Set(None),
    }
}

fn cart_line(user_id: i64, product_option_id: i64) -> cart::ActiveModel {
    cart::ActiveModel {
        id: NotSet,
        user_id: Set(user_id),
        product_option_id: Set(product_option_id),
        quantity: Set(2),
        created_at: Set(at(10)),
        updated_at: Set(at(10)),
        deleted_at: Set(None),
    }
}

fn assert_violates(result: Result<impl std::fmt::Debug, DbErr>, constraint: &str) {
    match result {
        Ok(value) => panic!("expected a violation of {constraint}, got Ok({value:?})"),
        Err(err) => assert!(err.to_string().contains(constraint), "expected a violation of {constraint}, got: {err}"),
    }
}

/// Runs the migrations up, exercises the schema through the entities, then rolls back (twice,
/// to prove `down` leaves nothing behind that would stop a second `up`).
async fn exercise_schema(db: &DatabaseConnection) {
    Migrator::up(db, None).await.expect("migrations up");
    assert!(
        Migrator::get_pending_migrations(db).await.expect("pending migrations").is_empty(),
        "every migration applied"
    );

    // Ids auto-increment.
    let alice = insert_user(db, "alice", 100).await;
    let bob = insert_user(db, "bob", 0).await;
    assert!(alice.id > 0 && bob.id > alice.id, "ids {} then {}", alice.id, bob.id);
    // One live user per name (`uq_users_live_name`; SQLite names the column instead of the index).
    let twin = user::ActiveModel { name: Set("alice".to_owned()), ..user::ActiveModel::from(alice.clone()) };
    let twin = user::ActiveModel { id: NotSet, ..twin }.insert(db).await.map(|u| u.id);
    match twin {
        Ok(id) => panic!("a second live alice was stored as {id}"),
        Err(e) => assert!(e.to_string().contains("uq_users_live_name") || e.to_string().contains("users.name"), "{e}"),
    }

    // CHECK (balance >= 0): an update making the balance negative fails and changes nothing.
    let negative = user::Entity::update_many()
        .col_expr(user::Column::Balance, Expr::value(-1_i64))
        .filter(user::Column::Id.eq(alice.id))
        .exec(db)
        .await
        .map(|r| r.rows_affected);
    assert_violates(negative, "ck_users_balance_non_negative");
    let reloaded = user::Entity::find_by_id(alice.id).one(db).await.expect("select user").expect("alice exists");
    assert_eq!(reloaded, alice, "row unchanged and round-trips through the entity");

    // Catalogue; CHECK (stock >= 0) and the status CHECK.
    let shirt = product::ActiveModel {
        id: NotSet,
        name: Set("T-shirt".to_owned()),
        status: Set("ACTIVE".to_owned()),
        created_at: Set(at(9)),
        updated_at: Set(at(9)),
        deleted_at: Set(None),
    }
    .insert(db)
    .await
    .expect("insert product");
    let bad_status = product::ActiveModel {
        id: NotSet,
        name: Set("Ghost".to_owned()),
        status: Set("DELETED".to_owned()),
        created_at: Set(at(9)),
        updated_at: Set(at(9)),
        deleted_at: Set(None),
    }
    .insert(db)
    .await;
    assert_violates(bad_status, "ck_products_status");
    let large_red = option_model(shirt.id, 5).insert(db).await.expect("insert option");
    assert_violates(option_model(shirt.id, -1).insert(db).await, "ck_product_options_stock_non_negative");

    // Partial unique index: one live cart line per (user, option); soft-deleted ones don't count.
    let line = cart_line(alice.id, large_red.id).insert(db).await.expect("insert cart line");
    let duplicate = cart_line(alice.id, large_red.id).insert(db).await;
    assert!(
        matches!(duplicate.as_ref().map_err(DbErr::sql_err), Err(Some(SqlErr::UniqueConstraintViolation(_)))),
        "second live line rejected: {duplicate:?}"
    );
    cart::Entity::update_many()
        .col_expr(cart::Column::DeletedAt, Expr::value(at(11)))
        .filter(cart::Column::Id.eq(line.id))
        .exec(db)
        .await
        .expect("soft-delete cart line");
    cart_line(alice.id, large_red.id).insert(db).await.expect("a new live line after the soft delete");

    // Foreign keys: ON DELETE RESTRICT, and no dangling reference on insert.
    // Trap: SQLite reports a RESTRICT violation as SQLITE_CONSTRAINT_TRIGGER (1811), which
    // `DbErr::sql_err()` does not classify (it knows 787 only), so match the message here.
    let delete_parent = product::Entity::delete_by_id(shirt.id).exec(db).await;
    assert!(
        matches!(&delete_parent, Err(err) if err.to_string().to_lowercase().contains("foreign key")),
        "deleting a product with options is restricted: {delete_parent:?}"
    );
    let dangling = cart_line(bob.id, large_red.id + 1_000).insert(db).await;
    assert!(
        matches!(dangling.as_ref().map_err(DbErr::sql_err), Err(Some(SqlErr::ForeignKeyConstraintViolation(_)))),
        "cart line of a missing option rejected: {dangling:?}"
    );

    // DATE and timestamptz round-trip; (sold_date, product_option_id) is unique.
    let day = NaiveDate::from_ymd_opt(2026, 11, 25).expect("valid date");
    let sales = daily_popular_product::ActiveModel {
        id: NotSet,
        product_id: Set(shirt.id),
        product_option_id: Set(large_red.id),
        sold_date: Set(day),
        total_sold: Set(3),
        updated_at: Set(at(12)),
    };
    let inserted = sales.clone().insert(db).await.expect("insert daily sales");
    assert_eq!((inserted.sold_date, inserted.updated_at), (day, at(12)));
    let second = sales.insert(db).await;
    assert!(
        matches!(second.as_ref().map_err(DbErr::sql_err), Err(Some(SqlErr::UniqueConstraintViolation(_)))),
        "one row per day and option: {second:?}"
    );

    Migrator::down(db, None).await.expect("migrations down");
    assert!(user::Entity::find().one(db).await.is_err(), "users table dropped by down");
    Migrator::up(db, None).await.expect("migrations up again");
    Migrator::down(db, None).await.expect("migrations down again");
}

#[tokio::test]
async fn migrations_up_and_down_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("shop.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let db = connect(&url).await.expect("open sqlite database");

    exercise_schema(&db).await;

    db.close().await.expect("close sqlite");
}

#[tokio::test]
async fn migrations_up_and_down_on_postgres() {
    let admin = match connect(PG_ADMIN_URL).await {
        Ok(admin) => admin,
        Err(err) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping the PostgreSQL migration test: {PG_ADMIN_URL} unreachable ({err})");
            return;
        }
        Err(err) => panic!("PostgreSQL is required when CI is set: {PG_ADMIN_URL}: {err}"),
    };

    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos();
    let name = format!("shop_test_mig_{nanos}_{}", std::process::id());
    admin.execute_unprepared(&format!(r#"CREATE DATABASE "{name}""#)).await.expect("create test database");

    let outcome = AssertUnwindSafe(async {
        let db = connect(&format!("{PG_BASE_URL}/{name}")).await.expect("connect to test database");
        exercise_schema(&db).await;
        db.close().await.expect("close test database");
    })
    .catch_unwind()
    .await;

    // Drop the database whatever happened, then report the test's own failure if any.
    admin.execute_unprepared(&format!(r#"DROP DATABASE "{name}" WITH (FORCE)"#)).await.expect("drop test database");
    admin.close().await.expect("close admin connection");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
