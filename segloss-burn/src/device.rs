//! One wgpu device shared by burn and segloss, opened either way round: segloss chooses and
//! opens it and registers it with burn ([`SharedDevice::new`]), burn opens its own and
//! segloss wraps its handles ([`SharedDevice::from_burn`]), or an application hands over
//! handles it opened itself ([`SharedDevice::from_setup`]). burn's handles cannot be had
//! after its device is initialised, so sharing takes part in device creation.

use burn::backend::wgpu::WgpuSetup;
use burn::tensor::Device;
use segloss::gpu::context;
use segloss::gpu::GpuContext;
use segloss::{Error, Result};
use std::sync::Arc;

/// A burn device and the segloss context on the same wgpu device and queue.
#[derive(Clone, Debug)]
pub struct SharedDevice {
    device: Device,
    ctx: Arc<GpuContext>,
}

/// The features burn's wgpu runtime can be given: everything the adapter has but mappable
/// primary buffers and wgpu's experimental features (cubecl refuses a device with them).
pub fn burn_features(adapter: &wgpu::Adapter) -> wgpu::Features {
    adapter.features()
        - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
        - wgpu::Features::all_experimental_mask()
}

use segloss::wgpu;

impl SharedDevice {
    /// segloss chooses the adapter as [`GpuContext::new`] does (a GPU first, else lavapipe;
    /// `WGPU_BACKEND` respected), opens a device with the adapter's limits and the features
    /// burn takes, and registers it with burn. On a CPU adapter it also keeps freed memory
    /// mapped, as segloss's own context does.
    pub fn new() -> Result<Self> {
        let adapter = context::choose(context::enumerate())?;
        if adapter.get_info().device_type == wgpu::DeviceType::Cpu {
            context::keep_freed_memory_mapped();
        }
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("segloss + burn"),
            required_features: burn_features(&adapter),
            ..context::device_descriptor(&adapter)
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&descriptor))
            .map_err(|e| Error::Gpu(format!("request_device: {e}")))?;
        let setup = WgpuSetup {
            instance: context::instance().clone(),
            backend: adapter.get_info().backend,
            adapter,
            device,
            queue,
        };
        Self::from_setup(setup)
    }

    /// burn opens its default wgpu device (`Device::wgpu_options().init_with_setup()`), and
    /// segloss shares its handles. Fails when burn's default wgpu runtime is already
    /// initialised (by this call or by a tensor op).
    pub fn from_burn() -> Result<Self> {
        let (device, setup) = Device::wgpu_options()
            .init_with_setup()
            .map_err(|e| Error::Gpu(format!("burn's wgpu device: {e}")))?;
        if setup.adapter.get_info().device_type == wgpu::DeviceType::Cpu {
            context::keep_freed_memory_mapped();
        }
        let ctx = GpuContext::from_device(setup.device, setup.queue, setup.adapter.get_info());
        Ok(SharedDevice {
            device,
            ctx: Arc::new(ctx),
        })
    }

    /// Handles an application opened itself (request the device with [`burn_features`] of
    /// the adapter), registered with burn as a new runtime.
    pub fn from_setup(setup: WgpuSetup) -> Result<Self> {
        let info = setup.adapter.get_info();
        let ctx = GpuContext::from_device(setup.device.clone(), setup.queue.clone(), info);
        let device = Device::wgpu_options()
            .setup(setup)
            .init()
            .map_err(|e| Error::Gpu(format!("registering the device with burn: {e}")))?;
        Ok(SharedDevice {
            device,
            ctx: Arc::new(ctx),
        })
    }

    /// The burn device (call `.autodiff()` on it for training).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The segloss context on the same wgpu device.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }
}
