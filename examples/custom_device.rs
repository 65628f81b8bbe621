//! segloss as the fused-loss backend of a wgpu program that owns its device, encoder and
//! buffers: the program's own kernel updates the logits with the gradient segloss writes,
//! all on the device; only the loss is read back, asynchronously, to print it.
//!
//! cargo run --release --example custom_device

use segloss::gpu::{context, DeviceBatch, GpuContext, GradTarget};
use segloss::input::LabelFormat;
use segloss::wgpu::{self, util::DeviceExt};
use segloss::{LossSpec, Shape};

/// The program's own kernel: one plain gradient step on the logits, z -= lr · ∂L/∂z.
const SGD: &str = r#"
@group(0) @binding(0) var<storage, read_write> z: array<f32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x < arrayLength(&z) {
        z[id.x] -= 2000.0 * g[id.x];
    }
}
"#;

fn main() -> segloss::Result<()> {
    // The program opens its own device, on segloss's instance (one wgpu instance per
    // process: wgpu cannot tell buffers of two instances apart), with the features and
    // limits segloss wants (`device_descriptor`; add the program's own features to it).
    let adapter = pollster::block_on(
        context::instance().request_adapter(&wgpu::RequestAdapterOptions::default()),
    )
    .map_err(|e| segloss::Error::NoAdapter(format!("{e}: {}", context::NO_ADAPTER_HELP)))?;
    if adapter.get_info().device_type == wgpu::DeviceType::Cpu {
        context::keep_freed_memory_mapped(); // lavapipe: see its documentation
    }
    let (device, queue) =
        pollster::block_on(adapter.request_device(&context::device_descriptor(&adapter)))
            .map_err(|e| segloss::Error::Gpu(e.to_string()))?;
    let ctx = GpuContext::from_device(device.clone(), queue.clone(), adapter.get_info());

    let shape = Shape::new(2, 3, &[64, 64]);
    // Labels: a disc of class 1 and a band of class 2 on class 0 in each image.
    let labels: Vec<u32> = (0..shape.batch * 64 * 64)
        .map(|k| {
            let (x, y) = ((k % 64) as i32 - 32, ((k / 64) % 64) as i32 - 32);
            if x * x + y * y < 150 {
                1
            } else if y > 20 {
                2
            } else {
                0
            }
        })
        .collect();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let logits = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("my logits"),
        contents: &vec![0u8; 4 * shape.len()],
        usage,
    });
    let label_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("my labels"),
        contents: bytemuck::cast_slice(&labels),
        usage,
    });
    let grad = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("my grad"),
        size: 4 * shape.len() as u64,
        usage,
        mapped_at_creation: false,
    });

    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("sgd"),
        source: wgpu::ShaderSource::Wgsl(SGD.into()),
    });
    let sgd = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("sgd"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &sgd.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: logits.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: grad.as_entire_binding(),
            },
        ],
    });

    let spec = LossSpec::from_json(
        r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice","weight":0.5}]}"#,
    )?;
    let batch = DeviceBatch::new(&shape, &logits, &label_buf, LabelFormat::U32);
    for step in 0..=30 {
        // One encoder: segloss's passes, then the program's update, then the next step.
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("train step"),
        });
        let rec = ctx.record(&mut enc, &spec, &batch, Some(GradTarget::f32(&grad)))?;
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&sgd);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups((shape.len() as u32).div_ceil(256), 1, 1);
        }
        queue.submit([enc.finish()]);
        if step % 5 == 0 {
            // The loss of this step (computed before the update), read asynchronously.
            let loss = rec.read_loss_async(&ctx);
            device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| segloss::Error::Gpu(e.to_string()))?;
            println!("step {step:>2}: loss {:.5}", pollster::block_on(loss)?);
        }
    }
    Ok(())
}
