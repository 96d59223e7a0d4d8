//! The protobuf codec of JobService: tonic-prost's, except that a request that cannot be
//! decoded (malformed bytes, nesting beyond prost's recursion limit) is INVALID_ARGUMENT with
//! an ErrorInfo reason, as every bad input is here. tonic-prost answers INTERNAL with prost's
//! description, which is neither the right code nor actionable; no crate offers the mapping,
//! hence this thin wrapper (wired in by build.rs through `codec_path`).
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::Error;

#[derive(Debug, Clone)]
pub struct JobsCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for JobsCodec<T, U> {
    fn default() -> Self {
        JobsCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for JobsCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = JobsDecoder<U>;

    /// tonic allocates each call's encode buffer up front (8 KiB by default) and a stream
    /// keeps it for its whole life: most of an idle stream's memory. 1 KiB holds a typical
    /// Job; a larger message grows the buffer as it is written. The yield threshold (32 KiB)
    /// is tonic's default.
    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(1024, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        JobsDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// tonic-prost's decoder with decode failures mapped to INVALID_ARGUMENT.
pub struct JobsDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for JobsDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|_| {
            Error::invalid(
                "request",
                "MALFORMED_MESSAGE",
                "the message could not be decoded as the RPC's request type (malformed \
                 protobuf, or Struct/Value nesting deeper than 100 levels)",
            )
            .into_status("")
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
