//! Argon2id password hashes in PHC format (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`): each hash carries its
//! own parameters, so raising them later leaves old hashes verifiable.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash as Phc, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use async_trait::async_trait;
use rand::RngCore;
use shop_domain::DomainError;
use shop_domain::auth::{Password, PasswordHash};
use shop_domain::ports::PasswordHasher;
use tokio::sync::Semaphore;

/// Argon2id's cost: memory in KiB, passes, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl HashParams {
    /// OWASP's minimum for Argon2id (19 MiB, 2 passes, 1 lane): the default.
    pub const OWASP: Self = Self { memory_kib: 19_456, iterations: 2, parallelism: 1 };
}

/// Hashes on tokio's blocking threads, at most a few at a time: a burst of sign-ins must not take every
/// thread, nor `memory_kib` per request of memory at once.
#[derive(Clone)]
pub struct Argon2Hasher {
    argon: Argon2<'static>,
    params: HashParams,
    running: Arc<Semaphore>,
}

impl std::fmt::Debug for Argon2Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Argon2Hasher").field("params", &self.params).finish_non_exhaustive()
    }
}

impl Argon2Hasher {
    /// # Errors
    /// A message naming what Argon2 refuses (memory below 8 KiB per lane, no passes...).
    pub fn new(params: HashParams) -> Result<Self, String> {
        let p =
            Params::new(params.memory_kib, params.iterations, params.parallelism, None).map_err(|e| e.to_string())?;
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Ok(Self {
            argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, p),
            params,
            running: Arc::new(Semaphore::new(cores)),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, DomainError> {
        let _turn = self.running.acquire().await.map_err(DomainError::unexpected)?;
        let argon = self.argon.clone();
        tokio::task::spawn_blocking(move || work(argon)).await.map_err(DomainError::unexpected)
    }
}

#[async_trait]
impl PasswordHasher for Argon2Hasher {
    async fn hash(&self, password: &Password) -> Result<PasswordHash, DomainError> {
        let password = password.expose().to_owned();
        let phc = self
            .blocking(move |argon| {
                // 128 random bits of salt, as the PHC string format recommends.
                let mut bytes = [0_u8; 16];
                rand::rng().fill_bytes(&mut bytes);
                let salt = SaltString::encode_b64(&bytes)?;
                argon.hash_password(password.as_bytes(), &salt).map(|hash| hash.to_string())
            })
            .await?
            .map_err(|e| DomainError::unexpected(e.to_string()))?;
        Ok(PasswordHash::new(phc))
    }

    async fn verify(&self, password: &Password, hash: &PasswordHash) -> Result<bool, DomainError> {
        let (password, stored) = (password.expose().to_owned(), hash.as_str().to_owned());
        self.blocking(move |argon| match Phc::new(&stored) {
            // The parameters come from the stored hash, not from this hasher's settings.
            Ok(parsed) => argon.verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "a stored password hash does not parse");
                false
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cheapest parameters Argon2 accepts: what the test suites use.
    const CHEAP: HashParams = HashParams { memory_kib: 8, iterations: 1, parallelism: 1 };

    #[tokio::test]
    async fn a_hash_verifies_its_password_only_and_carries_its_parameters() {
        let hasher = Argon2Hasher::new(CHEAP).unwrap();
        let right = Password::new("correct horse").unwrap();
        let hash = hasher.hash(&right).await.unwrap();
        assert!(hash.as_str().starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{}", hash.as_str());
        assert!(hasher.verify(&right, &hash).await.unwrap());
        assert!(!hasher.verify(&Password::new("battery staple").unwrap(), &hash).await.unwrap());
        assert_ne!(hasher.hash(&right).await.unwrap(), hash, "a fresh salt each time");
        // A hasher with other settings still verifies it: the parameters are in the hash.
        let stronger = Argon2Hasher::new(HashParams { memory_kib: 64, iterations: 2, parallelism: 1 }).unwrap();
        assert!(stronger.verify(&right, &hash).await.unwrap());
        assert!(!stronger.verify(&right, &PasswordHash::new("not a hash".into())).await.unwrap());
    }

    #[test]
    fn owasp_is_the_default_and_nonsense_is_refused() {
        assert!(Argon2Hasher::new(HashParams::OWASP).is_ok());
        assert!(Argon2Hasher::new(HashParams { memory_kib: 1, iterations: 1, parallelism: 1 }).is_err());
    }
}
