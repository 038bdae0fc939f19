//! The row-level fence behind the Redis lock strategies: a write under an older token than the row last
//! accepted is refused, on both stores.

use chrono::Utc;
use shop_domain::ids::ProductOptionId;
use shop_domain::ports::{FencedWrite, UnitOfWork};
use shop_persistence::SeaUnitOfWork;

use crate::helpers::TestApp;
use crate::on_both_stores;

on_both_stores!(a_write_under_an_older_token_is_refused);

async fn a_write_under_an_older_token_is_refused(app: TestApp) {
    let p = app.product("fenced", &[("one", 1, 3)]).await;
    let option = ProductOptionId::new(p["options"][0]["id"].as_i64().unwrap()).unwrap();
    let uow = SeaUnitOfWork::new(app.db.clone());
    let one = 1;
    let write = |fence: u64, units: i64| {
        let uow = uow.clone();
        async move {
            let mut tx = uow.begin().await.unwrap();
            let outcome = tx.decrement_stock(option, units, Some(fence), Utc::now()).await.unwrap();
            tx.commit().await.unwrap();
            outcome
        }
    };
    assert_eq!(write(5, one).await, FencedWrite::Written);
    assert_eq!(write(3, one).await, FencedWrite::Fenced { newest: 5 }, "a holder whose lock passed on is refused");
    assert_eq!(write(5, one).await, FencedWrite::Written, "the same hold may write again");
    assert_eq!(write(6, 5).await, FencedWrite::OutOfStock);
    assert_eq!(write(4, 5).await, FencedWrite::Fenced { newest: 5 }, "the fence is reported first");
    assert_eq!(app.scalar(&format!("SELECT stock FROM product_options WHERE id = {option}")).await, 1);
    assert_eq!(app.scalar(&format!("SELECT fence_token FROM product_options WHERE id = {option}")).await, 5);
}
