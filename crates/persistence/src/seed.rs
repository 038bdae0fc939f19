//! The demo data an empty embedded database starts with, so that `cargo run` shows something.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, DatabaseConnection, DbErr, EntityTrait, PaginatorTrait, Set, TransactionTrait};

use crate::entity::{product, product_option, user};

/// What [`seed_demo`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seeded {
    pub users: usize,
    pub products: usize,
    pub options: usize,
}

/// Option name, price, stock.
type DemoOption = (&'static str, i64, i64);

const CATALOGUE: &[(&str, &[DemoOption])] = &[
    ("Oxford shirt", &[("S / white", 39_000, 50), ("M / white", 39_000, 80), ("L / blue", 41_000, 30)]),
    ("Linen trousers", &[("30", 59_000, 20), ("32", 59_000, 25)]),
    ("Wool beanie", &[("One size", 15_000, 200)]),
];

/// A demo user: the name and password to sign in with (shown in the start-up log and the README: demo only),
/// and the balance it starts with.
#[derive(Debug, Clone, Copy)]
pub struct DemoUser {
    pub name: &'static str,
    pub password: &'static str,
    pub balance: i64,
}

pub const DEMO_USERS: &[DemoUser] = &[
    DemoUser { name: "demo-kim", password: "demo-kim-password", balance: 500_000 },
    DemoUser { name: "demo-lee", password: "demo-lee-password", balance: 100_000 },
];

/// Whether the database is empty (no user and no product): the only one [`seed_demo`] writes to.
///
/// # Errors
/// The driver's error.
pub async fn is_empty(db: &DatabaseConnection) -> Result<bool, DbErr> {
    Ok(user::Entity::find().count(db).await? == 0 && product::Entity::find().count(db).await? == 0)
}

/// Seeds the [`DEMO_USERS`] (with `hashes`, their passwords' hashes in the same order) and a small catalogue, in
/// one transaction, when the database has no user and no product.
///
/// # Errors
/// The driver's error; then nothing is written.
pub async fn seed_demo(
    db: &DatabaseConnection,
    now: DateTime<Utc>,
    hashes: &[String],
) -> Result<Option<Seeded>, DbErr> {
    if !is_empty(db).await? {
        return Ok(None);
    }
    let tx = db.begin().await?;
    for (demo, hash) in DEMO_USERS.iter().zip(hashes) {
        user::ActiveModel {
            name: Set(demo.name.to_owned()),
            balance: Set(demo.balance),
            version: Set(0),
            password_hash: Set(Some(hash.clone())),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
            ..Default::default()
        }
        .insert(&tx)
        .await?;
    }
    let mut options = 0;
    for (name, variants) in CATALOGUE {
        let p = product::ActiveModel {
            name: Set((*name).to_owned()),
            status: Set("ACTIVE".to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
            ..Default::default()
        }
        .insert(&tx)
        .await?;
        for (option, price, stock) in *variants {
            product_option::ActiveModel {
                product_id: Set(p.id),
                name: Set((*option).to_owned()),
                price: Set(*price),
                stock: Set(*stock),
                version: Set(0),
                fence_token: Set(0),
                created_at: Set(now),
                updated_at: Set(now),
                deleted_at: Set(None),
                ..Default::default()
            }
            .insert(&tx)
            .await?;
            options += 1;
        }
    }
    tx.commit().await?;
    Ok(Some(Seeded { users: DEMO_USERS.len(), products: CATALOGUE.len(), options }))
}
