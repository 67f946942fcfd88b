// Registry errors in the distribution JSON format: {"errors":[{code,message,detail}]}. Pure.

export type RegistryErrorCode =
  | 'BLOB_UNKNOWN'
  | 'MANIFEST_UNKNOWN'
  | 'MANIFEST_INVALID'
  | 'NAME_UNKNOWN'
  | 'NAME_INVALID'
  | 'TAG_INVALID'
  | 'DIGEST_INVALID'
  | 'UNAUTHORIZED'
  | 'DENIED'
  | 'UNSUPPORTED'
  | 'TOOMANYREQUESTS'
  | 'UNAVAILABLE'
  | 'PAGINATION_NUMBER_INVALID';

export interface RegistryError {
  readonly status: number;
  readonly code: RegistryErrorCode;
  readonly message: string;
  readonly detail?: unknown;
}

export const registryError = (status: number, code: RegistryErrorCode, message: string, detail?: unknown): RegistryError => ({
  status,
  code,
  message,
  ...(detail !== undefined ? { detail } : {}),
});

export function registryErrorBody(error: RegistryError): string {
  return JSON.stringify({ errors: [{ code: error.code, message: error.message, ...(error.detail !== undefined ? { detail: error.detail } : {}) }] });
}
