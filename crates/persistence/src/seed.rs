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

const USERS: &[(&str, i64)] = &[("demo-kim", 500_000), ("demo-lee", 100_000)];

/// Seeds two users and a small catalogue, in one transaction, when the database has no user and no product.
///
/// # Errors
/// The driver's error; then nothing is written.
pub async fn seed_demo(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<Option<Seeded>, DbErr> {
    if user::Entity::find().count(db).await? > 0 || product::Entity::find().count(db).await? > 0 {
        return Ok(None);
    }
    let tx = db.begin().await?;
    for (name, balance) in USERS {
        user::ActiveModel {
            name: Set((*name).to_owned()),
            balance: Set(*balance),
            version: Set(0),
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
    Ok(Some(Seeded { users: USERS.len(), products: CATALOGUE.len(), options }))
}
