//! The anti-rollback floor in TPM NV: a monotonic counter index
//! ([`FLOOR_COUNTER_INDEX`]) that only ever counts up, and an ordinary
//! 8-byte index ([`FLOOR_BASE_INDEX`]) with the counter's value at the
//! time it was defined. The TPM's floor is `counter - base`.
//!
//! The base exists because a counter index does not start at 0: its first
//! increment sets it to the highest value any counter of this TPM has
//! ever had (so deleting and defining a counter again never makes it go
//! back), plus one. Both indices are defined with owner authorization
//! (empty on most devices) and written under it; reading needs none.

use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::nv_index_type::NvIndexType;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::structures::{MaxNvBuffer, NvPublic, NvPublicBuilder};

use super::{DeviceError, Tpm, tpm};

/// NV index of the floor counter (the owner's range, "KX").
pub const FLOOR_COUNTER_INDEX: u32 = 0x0100_4b58;
/// NV index of the counter's value at definition.
pub const FLOOR_BASE_INDEX: u32 = 0x0100_4b59;

fn nv_public(index: u32, counter: bool) -> Result<NvPublic, DeviceError> {
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_auth_read(true)
        .with_no_da(true)
        .with_nv_index_type(if counter {
            NvIndexType::Counter
        } else {
            NvIndexType::Ordinary
        })
        .build()
        .map_err(tpm("NV attributes"))?;
    NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index).map_err(tpm("NV index"))?)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(8)
        .build()
        .map_err(tpm("NV public"))
}

impl Tpm {
    /// The public areas of the defined NV indices `index`.
    fn nv_defined(&mut self, index: u32) -> Result<Option<NvPublic>, DeviceError> {
        let all =
            tss_esapi::abstraction::nv::list(&mut self.ctx).map_err(tpm("list NV indices"))?;
        Ok(all
            .into_iter()
            .map(|(public, _)| public)
            .find(|p| u32::from(p.nv_index()) == index))
    }

    fn nv_handle(&mut self, index: u32) -> Result<NvIndexHandle, DeviceError> {
        let handle = NvIndexTpmHandle::new(index).map_err(tpm("NV index"))?;
        let object = self
            .ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(handle)))
            .map_err(tpm("TR_FromTPMPublic (NV index)"))?;
        Ok(NvIndexHandle::from(object))
    }

    fn nv_close(&mut self, handle: NvIndexHandle) {
        let mut object = ObjectHandle::from(handle);
        if let Err(e) = self.ctx.tr_close(&mut object) {
            tracing::warn!(error = %e, "unable to close an NV index handle");
        }
    }

    fn nv_read_u64(&mut self, handle: NvIndexHandle) -> Result<u64, DeviceError> {
        let data = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.nv_read(NvAuth::NvIndex(handle), handle, 8, 0))
            .map_err(tpm("NV_Read"))?;
        let bytes: [u8; 8] = data.value().try_into().map_err(|_| {
            DeviceError::Unexpected(format!(
                "an 8-byte NV index read {} bytes",
                data.value().len()
            ))
        })?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn nv_increment(&mut self, handle: NvIndexHandle) -> Result<(), DeviceError> {
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.nv_increment(NvAuth::Owner, handle))
            .map_err(tpm("NV_Increment"))
    }

    /// The floor the TPM holds (`counter - base`), `None` when its indices
    /// are not defined (the floor was never raised with this TPM).
    pub fn floor_counter(&mut self) -> Result<Option<u64>, DeviceError> {
        let (Some(counter), Some(base)) = (
            self.nv_defined(FLOOR_COUNTER_INDEX)?,
            self.nv_defined(FLOOR_BASE_INDEX)?,
        ) else {
            return Ok(None);
        };
        if !counter.attributes().written() || !base.attributes().written() {
            return Ok(None);
        }
        let (c, b) = self.read_counter_and_base()?;
        Ok(Some(c.saturating_sub(b)))
    }

    fn read_counter_and_base(&mut self) -> Result<(u64, u64), DeviceError> {
        let counter = self.nv_handle(FLOOR_COUNTER_INDEX)?;
        let c = self.nv_read_u64(counter);
        self.nv_close(counter);
        let base = self.nv_handle(FLOOR_BASE_INDEX)?;
        let b = self.nv_read_u64(base);
        self.nv_close(base);
        Ok((c?, b?))
    }

    /// Defines the counter and its base when missing (a power cut in
    /// between is finished here: the base is the counter's value while
    /// the TPM's floor is still 0). No handle is held across a listing of
    /// the indices: the listing closes the TPM objects it opened, which
    /// are the same as any handle open on the index.
    fn define_floor_counter(&mut self) -> Result<(), DeviceError> {
        let counter = self.nv_defined(FLOOR_COUNTER_INDEX)?;
        let base = self.nv_defined(FLOOR_BASE_INDEX)?;
        if counter.is_none() {
            let public = nv_public(FLOOR_COUNTER_INDEX, true)?;
            let handle = self
                .ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.nv_define_space(Provision::Owner, None, public)
                })
                .map_err(tpm("NV_DefineSpace (floor counter)"))?;
            self.nv_close(handle);
        }
        if !counter.is_some_and(|c| c.attributes().written()) {
            let handle = self.nv_handle(FLOOR_COUNTER_INDEX)?;
            let incremented = self.nv_increment(handle);
            self.nv_close(handle);
            incremented?;
        }
        if base.as_ref().is_some_and(|b| b.attributes().written()) {
            return Ok(());
        }
        let handle = self.nv_handle(FLOOR_COUNTER_INDEX)?;
        let value = self.nv_read_u64(handle);
        self.nv_close(handle);
        let value = value?;
        let handle = match base {
            Some(_) => self.nv_handle(FLOOR_BASE_INDEX)?,
            None => {
                let public = nv_public(FLOOR_BASE_INDEX, false)?;
                self.ctx
                    .execute_with_nullauth_session(|ctx| {
                        ctx.nv_define_space(Provision::Owner, None, public)
                    })
                    .map_err(tpm("NV_DefineSpace (floor base)"))?
            }
        };
        let written = MaxNvBuffer::try_from(value.to_be_bytes().to_vec())
            .map_err(tpm("NV data"))
            .and_then(|data| {
                self.ctx
                    .execute_with_nullauth_session(|ctx| {
                        ctx.nv_write(NvAuth::Owner, handle, data, 0)
                    })
                    .map_err(tpm("NV_Write (floor base)"))
            });
        self.nv_close(handle);
        written
    }

    /// Raises the TPM's floor towards `floor` by at most `max_steps`
    /// increments (each is an NV write); defines the indices on first use.
    /// Returns the TPM's floor now.
    pub fn raise_floor_counter(&mut self, floor: u64, max_steps: u64) -> Result<u64, DeviceError> {
        self.define_floor_counter()?;
        let (_, base) = self.read_counter_and_base()?;
        let counter = self.nv_handle(FLOOR_COUNTER_INDEX)?;
        let result = (|| {
            let mut now = self.nv_read_u64(counter)?.saturating_sub(base);
            let mut steps = 0;
            while now < floor && steps < max_steps {
                self.nv_increment(counter)?;
                now += 1;
                steps += 1;
            }
            Ok(self.nv_read_u64(counter)?.saturating_sub(base))
        })();
        self.nv_close(counter);
        result
    }
}
